"""Time and memory of ``taskvec analyze`` on the perf benchmark's models (issue 16's targets).

Base + 3 fine-tunes of the 1.1B bf16 Llama shape (``make_models.py``, cached). In one run:

1. the read-once bound: every input weight file read once, page cache warm (``run.read_all``);
2. ``taskvec analyze BASE FT1 FT2 FT3 -o REPORT`` (target: ≤ 2× the read, peak RSS < 2 GB);
3. the same with ``--spectra`` (8 sampled layers; target < 3 min).

Each command runs as a child; wall time, CPU time and peak RSS (``ru_maxrss`` from
``os.wait4``, and the sampled RssAnon: memory of its own, not mapped page cache) are recorded.

    .venv/bin/python benchmarks/perf/analyze_perf.py [--threads N] [--tiny] [--no-spectra]

Results: benchmarks/results/analyze-perf-<date>.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_models import ModelSpec, generate, model_names  # noqa: E402
from run import (  # noqa: E402
    DEFAULT_MODELS,
    DEFAULT_RESULTS,
    DEFAULT_WORK,
    TASKVEC,
    child_env,
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
    read_all(files)  # warm the page cache
    nbytes, read_s = read_all(files)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    report = a.work_dir / "analyze-report"
    threads = ["--threads", str(a.threads)] if a.threads else []
    base = [str(TASKVEC), "analyze", *map(str, models.values()), "-o", str(report)]
    base += ["--overwrite", "--no-progress", *threads]
    runs = {"analyze": base} if a.no_spectra else {"analyze": base, "spectra": [*base, "--spectra"]}
    results = {}
    for label, cmd in runs.items():
        res = run_child(cmd, a.work_dir / f"analyze-{label}.log", env=child_env())
        if res.rc != 0:
            raise SystemExit(f"{label} failed:\n{res.log_tail}")
        results[label] = dataclasses.asdict(res)
        print(
            f"{label}: {res.wall_s:.1f} s ({res.wall_s / read_s:.2f}× the read of "
            f"{nbytes / 1e9:.1f} GB in {read_s:.1f} s), peak RSS {res.maxrss_bytes / 1e9:.2f} GB, "
            f"RssAnon {res.peak_anon_bytes / 1e9:.2f} GB"
        )
    shutil.rmtree(report, ignore_errors=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    doc = {
        "date": stamp,
        "machine": machine_info(),
        "spec": spec.__dict__,
        "read_once": {"bytes": nbytes, "seconds": read_s},
        "runs": results,
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    path = a.out_dir / f"analyze-perf-{stamp}{'-tiny' if a.tiny else ''}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
