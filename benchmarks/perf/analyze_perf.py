"""Time and memory of ``taskvec analyze`` on the perf benchmark's models (issue 16's targets).

Base + 3 fine-tunes of the 1.1B bf16 Llama shape (``make_models.py``, cached). In one run:

1. the read-once bound: every input weight file read once, page cache warm (``run.read_all``),
   wall and CPU seconds; with ``--cold`` (root: ``drop_caches``) also after dropping the cache;
2. ``taskvec analyze BASE FT1 FT2 FT3 -o REPORT`` (target: ≤ 2× the read, peak RSS < 2 GB);
3. the same with ``--spectra`` (8 sampled layers; target < 3 min).

Each command runs as a child (warm cache; with ``--cold`` once more after dropping it); wall
time, CPU time (user + sys) and peak RSS (``ru_maxrss`` from ``os.wait4``, and the sampled
RssAnon: memory of its own, not mapped page cache) are recorded.

    .venv/bin/python benchmarks/perf/analyze_perf.py [--threads N] [--tiny] [--no-spectra] [--cold]

Results: benchmarks/results/analyze-perf.json and analyze-perf.md (``-tiny`` for ``--tiny``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_models import ModelSpec, generate, model_names  # noqa: E402
from run import (  # noqa: E402
    DEFAULT_MODELS,
    DEFAULT_RESULTS,
    DEFAULT_WORK,
    TASKVEC,
    can_drop_caches,
    child_env,
    drop_caches,
    machine_info,
    read_all,
    run_child,
    safetensor_files,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="2-layer toy models (a quick check).")
    parser.add_argument("--no-spectra", action="store_true")
    parser.add_argument("--cold", action="store_true", help="Also cold-cache runs (root).")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    a = parser.parse_args()
    if a.tiny:
        spec = ModelSpec(hidden=256, intermediate=512, layers=2, heads=8, kv_heads=2, vocab=512)
        models_dir = DEFAULT_MODELS.parent / "tiny-models"
    else:
        spec = ModelSpec()
        models_dir = DEFAULT_MODELS
    folders = generate(spec, models_dir)
    models = dict(zip(model_names(spec), folders, strict=True))
    files = [f for folder in folders for f in safetensor_files(folder)]
    cold = a.cold and can_drop_caches()
    read = {}
    if cold:
        drop_caches()
        read["cold_seconds"] = read_all(files)[1]
    read_all(files)  # warm the page cache
    cpu = time.process_time()
    nbytes, read_s = read_all(files)
    read |= {"bytes": nbytes, "seconds": read_s, "cpu_seconds": time.process_time() - cpu}
    a.work_dir.mkdir(parents=True, exist_ok=True)
    report = a.work_dir / "analyze-report"
    threads = ["--threads", str(a.threads)] if a.threads else []
    base = [str(TASKVEC), "analyze", *map(str, models.values()), "-o", str(report)]
    base += ["--overwrite", "--no-progress", *threads]
    runs = {"analyze": base} if a.no_spectra else {"analyze": base, "spectra": [*base, "--spectra"]}
    results = {}
    for label, cmd in runs.items():
        for cache in ("warm", "cold") if cold else ("warm",):
            if cache == "cold":
                drop_caches()
            else:
                read_all(files)
            res = run_child(cmd, a.work_dir / f"analyze-{label}-{cache}.log", env=child_env())
            if res.rc != 0:
                raise SystemExit(f"{label} failed:\n{res.log_tail}")
            results[f"{label} ({cache})"] = dataclasses.asdict(res)
    shutil.rmtree(report, ignore_errors=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    doc = {
        "date": stamp,
        "machine": machine_info(),
        "spec": spec.__dict__,
        "read_once": read,
        "runs": results,
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.out_dir / f"analyze-perf{'-tiny' if a.tiny else ''}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {stem}.json and {stem}.md")


def markdown(doc: dict) -> str:
    """One table: each run's wall and CPU seconds against the read-once bound, and its memory."""
    read = doc["read_once"]
    cold = read.get("cold_seconds")
    lines = [
        f"# taskvec analyze: time and memory ({doc['date']})",
        "",
        f"Read once ({read['bytes'] / 1e9:.2f} GB): warm {read['seconds']:.2f} s wall, "
        f"{read['cpu_seconds']:.2f} s CPU"
        + (f"; cold {cold:.2f} s" if cold else "")
        + ". Targets (issue 16): ≤ 2× the read, peak RSS < 2 GB; `--spectra` < 3 min.",
        "",
        "| run | wall s | × read | CPU s (user+sys) | peak RSS GB | RssAnon GB |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in doc["runs"].items():
        bound = cold if "cold" in label else read["seconds"]
        lines.append(
            f"| {label} | {r['wall_s']:.1f} | {r['wall_s'] / bound:.2f} | "
            f"{r['user_s'] + r['sys_s']:.1f} | {r['maxrss_bytes'] / 1e9:.2f} | "
            f"{r['peak_anon_bytes'] / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
