"""Time taskvec against mergekit on the same merges of ~1.1B-parameter bf16 Llamas.

For each method, one mergekit YAML is written and given to both tools, each run as a
child process. Per run it records wall time, CPU time (user + sys of the child and its
waited-for descendants, from ``os.wait4``) and peak RSS (``ru_maxrss``). In the same
invocation it measures an I/O bound: the time to read every input byte in 16 MB chunks
plus the time to write an output of the merged model's size, page cache warm and (when
``/proc/sys/vm/drop_caches`` is writable) cold.

Results go to ``<out-dir>/perf-<date>.json`` and a Markdown summary ``<out-dir>/perf.md``.
``--report A.json B.json ...`` rebuilds the Markdown from earlier JSON files (the
newest record per tool, method and dtype setting wins).

    python benchmarks/perf/run.py --methods linear,task_arithmetic --repeats 3
    python benchmarks/perf/run.py --methods ties --repeats 1 --tools mergekit
    python benchmarks/perf/run.py --report benchmarks/results/perf-*.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from make_models import ModelSpec, generate, model_names  # noqa: E402

DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK = REPO / "benchmarks" / ".cache" / "work"
DEFAULT_MODELS = REPO / "benchmarks" / ".cache" / "models"
TASKVEC = REPO / ".venv" / "bin" / "taskvec"
MERGEKIT = Path("/tmp/mk-venv/bin/mergekit-yaml")
CHUNK = 16 * 1024 * 1024
ALL_METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "della",
    "slerp",
    "model_stock",
]
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


# --------------------------------------------------------------------------- configs


def method_config(method: str, models: dict[str, Path], work_dtype: str) -> dict[str, Any]:
    """The mergekit YAML (as a dict) for ``method`` over the base and fine-tunes."""
    base = str(models["base"])
    fts = [str(p) for n, p in models.items() if n != "base"]
    cfg: dict[str, Any] = {"merge_method": method}
    if method == "linear":
        cfg["models"] = [{"model": m, "parameters": {"weight": 1.0}} for m in fts]
    elif method == "task_arithmetic":
        cfg["base_model"] = base
        cfg["models"] = [{"model": m, "parameters": {"weight": 0.5}} for m in fts]
    elif method in ("ties", "dare_ties"):
        cfg["base_model"] = base
        cfg["models"] = [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts]
    elif method == "breadcrumbs":
        cfg["base_model"] = base
        cfg["models"] = [
            {"model": m, "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}} for m in fts
        ]
    elif method == "della":
        cfg["base_model"] = base
        cfg["models"] = [
            {"model": m, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for m in fts
        ]
    elif method == "slerp":
        cfg["base_model"] = base
        cfg["models"] = [{"model": base}, {"model": fts[0]}]
        cfg["parameters"] = {"t": 0.5}
    elif method == "model_stock":
        cfg["base_model"] = base
        cfg["models"] = [{"model": m} for m in fts]
    else:
        raise SystemExit(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
    if work_dtype == "bfloat16":
        cfg["dtype"] = "bfloat16"
    else:
        cfg["dtype"] = work_dtype
        cfg["out_dtype"] = "bfloat16"
    return cfg


# --------------------------------------------------------------------------- measurement


def compare_in_child(a: Path, b: Path, base: Path) -> dict[str, Any]:
    """``compare_outputs.py`` in a child process. Loading two outputs here would raise this
    process's peak RSS, and Linux carries a parent's ``ru_maxrss`` over fork and exec, so every
    later child would report at least that much."""
    script = HERE / "compare_outputs.py"
    args = [sys.executable, str(script), str(a), str(b), "--base", str(base)]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


@dataclass
class ChildResult:
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_bytes: int
    peak_anon_bytes: int  # sampled RssAnon of the child itself (misses spikes < 50 ms)
    peak_file_bytes: int  # sampled RssFile: mmap'd file pages (reclaimable page cache)
    log_tail: str


class RssSampler(threading.Thread):
    """Polls ``/proc/PID/status`` every ``period`` s for the peak RssAnon and RssFile."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.period = period
        self.stop = threading.Event()
        self.peak_anon = 0
        self.peak_file = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_anon = max(self.peak_anon, int(line.split()[1]) * 1024)
                elif line.startswith("RssFile:"):
                    self.peak_file = max(self.peak_file, int(line.split()[1]) * 1024)
            self.stop.wait(self.period)


def run_child(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``cmd`` with its output in ``log_path``; resources from ``os.wait4`` for it alone."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = RssSampler(proc.pid)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace")[-3000:]
    return ChildResult(
        rc=proc.returncode,
        wall_s=wall,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        maxrss_bytes=ru.ru_maxrss * 1024,  # Linux reports KiB
        peak_anon_bytes=sampler.peak_anon,
        peak_file_bytes=sampler.peak_file,
        log_tail=tail,
    )


def can_drop_caches() -> bool:
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def read_all(files: list[Path]) -> tuple[int, float]:
    """Read ``files`` in 16 MB chunks; return (bytes, seconds)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def write_bytes(path: Path, nbytes: int) -> tuple[float, float]:
    """Write ``nbytes`` in 16 MB chunks; return (seconds without fsync, seconds of the fsync)."""
    chunk = os.urandom(CHUNK)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(memoryview(chunk)[: min(CHUNK, left)])
        t1 = time.perf_counter()
        os.fsync(f.fileno())
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def io_bound(inputs: list[Path], out_bytes: int, work: Path, cold: bool) -> dict[str, Any]:
    """Read-all-inputs + write-one-output timings; warm, and cold when allowed."""
    res: dict[str, Any] = {"chunk_bytes": CHUNK, "load_avg_start": list(os.getloadavg())}
    read_all(inputs)  # warm the page cache
    nbytes, warm_read = read_all(inputs)
    target = work / "io-bound.bin"
    write_s, fsync_s = write_bytes(target, out_bytes)
    target.unlink()
    res.update(
        read_bytes=nbytes,
        write_bytes=out_bytes,
        warm_read_s=warm_read,
        warm_read_gbps=nbytes / warm_read / 1e9,
        write_s=write_s,
        fsync_s=fsync_s,
        write_fsync_gbps=out_bytes / (write_s + fsync_s) / 1e9,
        bound_warm_s=warm_read + write_s,
        bound_warm_fsync_s=warm_read + write_s + fsync_s,
    )
    if cold and can_drop_caches():
        drop_caches()
        _, cold_read = read_all(inputs)
        res.update(
            cold_read_s=cold_read,
            cold_read_gbps=nbytes / cold_read / 1e9,
            bound_cold_s=cold_read + write_s + fsync_s,
        )
        read_all(inputs)  # leave the cache warm for the tools
    else:
        res["cold_read_s"] = None
        res["cold_note"] = "drop_caches not writable (need root)" if cold else "skipped"
    return res


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def safetensor_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- tools


def tool_command(
    tool: str, config: Path, out: Path, taskvec_threads: int | None, seed: int
) -> list[str]:
    if tool == "taskvec":
        cmd = [str(TASKVEC), "merge", str(config), str(out), "--overwrite", "--no-progress"]
        cmd += ["--random-seed", str(seed)]
        if taskvec_threads:
            cmd += ["--threads", str(taskvec_threads)]
        return cmd
    if tool == "mergekit":
        return [
            str(MERGEKIT),
            str(config),
            str(out),
            "--no-write-model-card",
            "--no-copy-tokenizer",
            "--quiet",
            "--random-seed",
            str(seed),
        ]
    raise SystemExit(f"unknown tool {tool!r}")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # no network: make Hub lookups fail fast instead of timing out
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("VIRTUAL_ENV", None)
    return env


def startup_time(tool: str) -> float | None:
    exe = TASKVEC if tool == "taskvec" else MERGEKIT
    cmd = [str(exe), "merge", "--help"] if tool == "taskvec" else [str(exe), "--help"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, env=child_env())
    return time.perf_counter() - t0 if r.returncode == 0 else None


def python_versions(python: Path, packages: list[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {'python': sys.version.split()[0]}\n"
        f"for p in {packages!r}:\n"
        "    try: out[p] = m.version(p)\n"
        "    except Exception: out[p] = None\n"
        "import torch; out['torch_threads'] = torch.get_num_threads()\n"
        "print(json.dumps(out))\n"
    )
    try:
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        return {"error": str(e)}


def git_state() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes (the venv's taskvec is
    an editable install, so those changes are what runs)."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return r.stdout.rstrip() if r.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_changes": git("status", "--porcelain", "--", "src").splitlines(),
    }


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    flags: list[str] = []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                all_flags = line.split(":", 1)[1].split()
                flags = sorted(x for x in all_flags if x.startswith(("avx512_bf16", "amx", "avx2")))
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    return {
        "cpu_model": cpu,
        "cpu_flags_of_note": flags,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_start": list(os.getloadavg()),
        "disk_free_gb": round(shutil.disk_usage(REPO).free / 1e9, 1),
    }


# --------------------------------------------------------------------------- report


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Median wall/CPU/RSS per (method, work dtype, tool) over successful repeats."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["rc"] == 0:
            groups.setdefault((r["method"], r["work_dtype"], r["tool"]), []).append(r)
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key, rs in groups.items():
        out[key] = {
            "n": len(rs),
            "wall_s": _median([r["wall_s"] for r in rs]),
            "wall_sync_s": _median([r["wall_s"] + r.get("sync_after_s", 0.0) for r in rs]),
            "wall_min_s": min(r["wall_s"] for r in rs),
            "wall_max_s": max(r["wall_s"] for r in rs),
            "cpu_s": _median([r["user_s"] + r["sys_s"] for r in rs]),
            "rss_gb": _median([r["maxrss_bytes"] / 1e9 for r in rs]),
            "anon_gb": _median([r.get("peak_anon_bytes", 0) / 1e9 for r in rs]),
            "load": _median([r["load_avg_start"][0] for r in rs]),
            "date": max(r["date"] for r in rs),
        }
    return out


def render_markdown(docs: list[dict[str, Any]]) -> str:
    runs: list[dict[str, Any]] = []
    for d in docs:
        for r in d["runs"]:
            runs.append({**r, "date": d["date"]})
    # newest document wins per key: keep only runs from the newest doc that has that key
    newest: dict[tuple[str, str, str], str] = {}
    for r in runs:
        k = (r["method"], r["work_dtype"], r["tool"])
        if r["rc"] == 0 and r["date"] > newest.get(k, ""):
            newest[k] = r["date"]
    runs = [r for r in runs if newest.get((r["method"], r["work_dtype"], r["tool"])) == r["date"]]
    summ = summarize(runs)
    last = max(docs, key=lambda d: d["date"])
    io = last["io_bound"]
    m = last["machine"]
    spec = last["models"]["spec"]
    lines = [
        "# taskvec vs mergekit: merge performance",
        "",
        "Generated by `benchmarks/perf/run.py` (see `benchmarks/perf/README.md`). "
        f"Source files: {', '.join(sorted({d['file'] for d in docs}))}. Where several "
        "files measured the same tool, method and dtype, the newest file's runs are used.",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, {m['ram_gb']} GB RAM, "
        f"kernel {m['kernel']}. Models: base + {spec['finetunes']} fine-tunes, each "
        f"{io['write_bytes'] / 1e9:.2f} GB bf16 ({io['write_bytes'] / 2e9:.2f}B parameters; "
        f"hidden {spec['hidden']}, {spec['layers']} layers, vocab {spec['vocab']}); output bf16. "
        f"Versions: taskvec {last['versions']['taskvec'].get('taskvec')}, "
        f"mergekit {last['versions']['mergekit'].get('mergekit')}, torch "
        f"{last['versions']['taskvec'].get('torch')}.",
        "",
        "## I/O bound",
        "",
        f"Read {io['read_bytes'] / 1e9:.2f} GB of inputs (4 models) in 16 MB chunks, then "
        f"write {io['write_bytes'] / 1e9:.2f} GB (one output), once per invocation of run.py. "
        "Warm = second read with the page cache full; cold = after `drop_caches`. "
        "Bound, warm = warm read + write without fsync; bound, cold = cold read + write + "
        "fsync. × bound below uses the median warm bound over these rows.",
        "",
        "| result file | load | warm read s (GB/s) | cold read s (GB/s) | write s (GB/s) "
        "| fsync s | bound warm s | bound warm+fsync s | bound cold s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bounds: list[float] = []
    for d in sorted(docs, key=lambda d: d["date"]):
        b = d.get("io_bound") or {}
        if "warm_read_s" not in b:
            continue
        bounds.append(b["bound_warm_s"])
        cold = (
            f"{b['cold_read_s']:.2f} ({b['cold_read_gbps']:.2f})" if b.get("cold_read_s") else "—"
        )
        bound_cold = f"{b['bound_cold_s']:.2f}" if b.get("cold_read_s") else "—"
        lines.append(
            f"| {d['file']} | {b['load_avg_start'][0]:.2f} | {b['warm_read_s']:.2f} "
            f"({b['warm_read_gbps']:.2f}) | {cold} | {b['write_s']:.2f} "
            f"({b['write_bytes'] / b['write_s'] / 1e9:.2f}) | {b['fsync_s']:.2f} | "
            f"{b['bound_warm_s']:.2f} | {b['bound_warm_fsync_s']:.2f} | {bound_cold} |"
        )
    bound = _median(bounds) if bounds else None
    if bound:
        lines += ["", f"Median warm bound: **{bound:.2f} s**."]
    lines += [
        "",
        "## Per tool",
        "",
        "Medians over the repeats (n); wall range in brackets. CPU = user + sys of the child. "
        "+sync = wall plus the `sync` run right after the child exits (flushes what it left "
        "dirty; taskvec fsyncs its shards itself, mergekit does not). "
        "Peak RSS = `ru_maxrss` (includes mmap'd input pages, which are reclaimable page "
        "cache); peak anon = the largest sampled RssAnon (heap: tensors, buffers), polled "
        "every 50 ms. "
        "× bound = wall ÷ the warm I/O bound. Load = 1-min load average before the run.",
        "",
        "| method | work dtype | tool | n | wall s | +sync s | CPU s | peak RSS GB "
        "| peak anon GB | × bound | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    keys = sorted(summ, key=lambda k: (order.get(k[0], 99), k[1], k[2] != "taskvec"))
    for k in keys:
        s = summ[k]
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {s['n']} | {s['wall_s']:.1f} "
            f"[{s['wall_min_s']:.1f}–{s['wall_max_s']:.1f}] | {s['wall_sync_s']:.1f} | "
            f"{s['cpu_s']:.1f} | {s['rss_gb']:.2f} | {s['anon_gb']:.2f} | "
            f"{format(s['wall_s'] / bound, '.1f') if bound else '—'} | {s['load']:.2f} |"
        )
    lines += [
        "",
        "## Side by side",
        "",
        "Speed-up = mergekit wall ÷ taskvec wall (and the same with the trailing sync); "
        "RSS ratio = mergekit peak RSS ÷ taskvec's.",
        "",
        "| method | work dtype | taskvec wall s | mergekit wall s | speed-up | speed-up +sync "
        "| taskvec RSS GB | mergekit RSS GB | RSS ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pairs = sorted({(k[0], k[1]) for k in summ}, key=lambda p: (order.get(p[0], 99), p[1]))
    for meth, wd in pairs:
        tv = summ.get((meth, wd, "taskvec"))
        mk = summ.get((meth, wd, "mergekit"))

        def f(x: dict[str, Any] | None, key: str, fmt: str) -> str:
            return format(x[key], fmt) if x else "—"

        speed = f"{mk['wall_s'] / tv['wall_s']:.2f}×" if tv and mk else "—"
        speed_sync = f"{mk['wall_sync_s'] / tv['wall_sync_s']:.2f}×" if tv and mk else "—"
        rss = f"{mk['rss_gb'] / tv['rss_gb']:.2f}×" if tv and mk else "—"
        lines.append(
            f"| {meth} | {wd} | {f(tv, 'wall_s', '.1f')} | {f(mk, 'wall_s', '.1f')} | {speed} "
            f"| {speed_sync} "
            f"| {f(tv, 'rss_gb', '.2f')} | {f(mk, 'rss_gb', '.2f')} | {rss} |"
        )
    checks = {
        k: v for d in sorted(docs, key=lambda d: d["date"]) for k, v in d.get("checks", {}).items()
    }
    if checks:
        lines += [
            "",
            "## Output agreement (taskvec vs mergekit)",
            "",
            "Relative L2 error ‖taskvec − mergekit‖ / ‖mergekit‖ over the whole model; the "
            "same against the merged task vector, ‖taskvec − mergekit‖ / ‖mergekit − base‖ "
            "(the part the merge changes: the fine-tunes differ from the base by ~1.4 %); "
            "the worst single tensor, the largest absolute difference and the share of "
            "bit-identical elements. DARE and DELLA draw different random masks in the two "
            "tools, so they are not expected to agree. TIES and Breadcrumbs keep the "
            "largest magnitudes: in bfloat16 thousands of entries share the cut-off value, and "
            "mergekit's unstable `argsort` keeps a different subset of them than taskvec's "
            "position order (1–2 % of the entries differ); `make parity` checks both at 1e-5 "
            "on float32 checkpoints. Model Stock's t is about 0.04 on these "
            "synthetic fine-tunes (mean pairwise cosine ≈ 0.014), so the merge moves each "
            "weight by a few 10⁻⁴ of its size, below bfloat16's resolution (2⁻⁹ ≈ 2·10⁻³): "
            "mergekit computes in bfloat16 and taskvec in float32, the outputs differ by "
            "bfloat16 rounding (rel L2 ≈ 2⁻⁹), and the task-vector column compares rounding "
            "noise. `make parity` checks Model Stock against mergekit at 1e-5 on float32 "
            "checkpoints.",
            "",
            "| method / dtype | tensors | rel L2 | rel L2 of task vector | worst tensor rel L2 "
            "| max abs diff | identical |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, c in sorted(checks.items(), key=lambda kv: order.get(kv[0].split("/")[0], 99)):
            miss = len(c["only_in_a"]) + len(c["only_in_b"]) + len(c["mismatched"])
            tvr = c.get("rel_l2_task_vector")
            tv_rel = "—" if tvr is None else f"{tvr:.2e}"
            lines.append(
                f"| {k} | {c['tensors_compared']}{f' ({miss} unmatched)' if miss else ''} | "
                f"{c['rel_l2']:.2e} | {tv_rel} | {c['worst_tensor_rel_l2']:.2e} | "
                f"{c['max_abs_diff']:.2e} | "
                f"{c['identical_fraction']:.1%} |"
            )
    failed = [r for r in runs if r["rc"] != 0]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            tail = r["log_tail"].strip().splitlines()[-1:] or [""]
            lines.append(
                f"- {r['tool']} {r['method']} ({r['work_dtype']}): rc {r['rc']}: {tail[0]}"
            )
    if last.get("startup_s"):
        lines += ["", "## Start-up", ""]
        for tool, s in last["startup_s"].items():
            if s is not None:
                lines.append(f"- `{tool}` help text: {s:.1f} s (import time, included in wall)")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default="linear,task_arithmetic", help="comma list or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", default="taskvec,mergekit")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS, help="results folder")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="scratch for outputs")
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS)
    ap.add_argument(
        "--work-dtype",
        default="bfloat16",
        help="YAML `dtype:` (comma list). bfloat16 = `dtype: bfloat16`; float32 = "
        "`dtype: float32` + `out_dtype: bfloat16`",
    )
    ap.add_argument("--taskvec-threads", type=int, default=None, help="taskvec --threads")
    ap.add_argument("--seed", type=int, default=0, help="--random-seed for both tools")
    ap.add_argument("--no-io-bound", action="store_true", help="skip the I/O-bound measurement")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache read")
    ap.add_argument("--tiny", action="store_true", help="2-layer toy models (harness check)")
    ap.add_argument(
        "--check",
        action="store_true",
        help="compare taskvec's and mergekit's outputs after the first repeat",
    )
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    ap.add_argument("--report", nargs="+", type=Path, help="only rebuild perf.md from JSON files")
    a = ap.parse_args(argv)

    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.report:
        docs = [json.loads(p.read_text()) | {"file": p.name} for p in a.report]
        (a.out_dir / "perf.md").write_text(render_markdown(docs))
        print(a.out_dir / "perf.md")
        return 0

    methods = ALL_METHODS if a.methods == "all" else [m for m in a.methods.split(",") if m]
    tools = [t for t in a.tools.split(",") if t]
    dtypes = [d for d in a.work_dtype.split(",") if d]
    for m in methods:
        method_config(m, {"base": Path("b"), "ft1": Path("f")}, "bfloat16")  # validate names
    exes = {"taskvec": TASKVEC, "mergekit": MERGEKIT}
    for t in tools:
        if t not in exes or not exes[t].exists():
            raise SystemExit(f"tool {t!r} not found at {exes.get(t)}")

    if a.tiny:
        spec = ModelSpec(hidden=256, intermediate=512, layers=2, heads=8, kv_heads=2, vocab=512)
        models_dir = a.models_dir.parent / "tiny-models"
    else:
        spec = ModelSpec()
        models_dir = a.models_dir
    folders = generate(spec, models_dir)
    models = dict(zip(model_names(spec), folders, strict=True))
    inputs = [f for folder in folders for f in safetensor_files(folder)]
    out_bytes = sum(p.stat().st_size for p in safetensor_files(models["base"]))

    work = a.work_dir
    work.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    result_path = a.out_dir / f"perf-{stamp}{'-' + a.tag if a.tag else ''}.json"
    doc: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_state(),
        "versions": {
            "taskvec": python_versions(
                TASKVEC.parent / "python", ["taskvec", "torch", "safetensors"]
            ),
            "mergekit": python_versions(
                MERGEKIT.parent / "python", ["mergekit", "torch", "safetensors", "transformers"]
            ),
        },
        "models": {"spec": spec.__dict__, "dir": str(models_dir), "input_bytes": 0},
        "options": {
            "methods": methods,
            "tools": tools,
            "repeats": a.repeats,
            "work_dtypes": dtypes,
            "taskvec_threads": a.taskvec_threads,
            "seed": a.seed,
        },
        "notes": [
            "taskvec fsyncs its output shards before renaming the folder into place; "
            "mergekit does not fsync.",
            "Resources via os.wait4 on the child: ru_maxrss is the peak RSS of the child "
            "(the largest of it and its waited-for descendants).",
        ],
        "startup_s": {t: startup_time(t) for t in tools},
        "io_bound": None,
        "runs": [],
        "checks": {},
    }
    doc["models"]["input_bytes"] = sum(p.stat().st_size for p in inputs)

    def save() -> None:
        result_path.write_text(json.dumps(doc, indent=2) + "\n")
        (a.out_dir / "perf.md").write_text(render_markdown([doc | {"file": result_path.name}]))

    if not a.no_io_bound:
        print("measuring the I/O bound ...", file=sys.stderr)
        doc["io_bound"] = io_bound(inputs, out_bytes, work, cold=not a.no_cold)
        print(json.dumps(doc["io_bound"], indent=1), file=sys.stderr)
    else:
        read_all(inputs)
        doc["io_bound"] = {
            "read_bytes": doc["models"]["input_bytes"],
            "write_bytes": out_bytes,
            "skipped": True,
        }

    for rep in range(a.repeats):
        for method in methods:
            for wd in dtypes:
                cfg_path = work / f"{method}-{wd}.yaml"
                cfg_path.write_text(yaml.safe_dump(method_config(method, models, wd)))
                # alternate the tool order between repeats so drift in load hits both
                order = tools if rep % 2 == 0 else list(reversed(tools))
                outs: dict[str, Path] = {}
                for tool in order:
                    out = work / f"out-{tool}-{method}"
                    outs[tool] = out
                    if out.exists():
                        shutil.rmtree(out)
                    cmd = tool_command(tool, cfg_path, out, a.taskvec_threads, a.seed)
                    load = list(os.getloadavg())
                    print(
                        f"[{rep + 1}/{a.repeats}] {tool} {method} ({wd}) load {load[0]:.2f}",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                    res = run_child(cmd, work / f"log-{tool}-{method}.txt", env=child_env())
                    # flush what the tool left dirty in the page cache (mergekit does not fsync)
                    t_sync = time.perf_counter()
                    os.sync()
                    sync_s = time.perf_counter() - t_sync
                    size = dir_bytes(out) if out.exists() else 0
                    print(
                        f" -> rc {res.rc}, wall {res.wall_s:.1f}s (+sync {sync_s:.1f}s), cpu "
                        f"{res.user_s + res.sys_s:.1f}s, rss {res.maxrss_bytes / 1e9:.2f} GB",
                        file=sys.stderr,
                    )
                    if res.rc != 0:
                        print(res.log_tail, file=sys.stderr)
                    doc["runs"].append(
                        {
                            "tool": tool,
                            "method": method,
                            "work_dtype": wd,
                            "repeat": rep,
                            "cmd": cmd,
                            "load_avg_start": load,
                            "load_avg_end": list(os.getloadavg()),
                            "rc": res.rc,
                            "wall_s": res.wall_s,
                            "sync_after_s": sync_s,
                            "user_s": res.user_s,
                            "sys_s": res.sys_s,
                            "maxrss_bytes": res.maxrss_bytes,
                            "peak_anon_bytes": res.peak_anon_bytes,
                            "peak_file_bytes": res.peak_file_bytes,
                            "output_bytes": size,
                            "log_tail": res.log_tail if res.rc != 0 else res.log_tail[-500:],
                        }
                    )
                    if not (a.check and rep == 0) and out.exists():
                        shutil.rmtree(out)
                    save()
                if a.check and rep == 0:
                    if all((outs[t] / "config.json").exists() for t in ("taskvec", "mergekit")):
                        print(f"comparing outputs of {method} ...", file=sys.stderr)
                        c = compare_in_child(outs["taskvec"], outs["mergekit"], models["base"])
                        doc["checks"][f"{method}/{wd}"] = c
                        print(json.dumps(c), file=sys.stderr)
                    for out in outs.values():
                        if out.exists():
                            shutil.rmtree(out)
                    save()
    save()
    print(result_path, file=sys.stderr)
    print(a.out_dir / "perf.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
