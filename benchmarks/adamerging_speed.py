"""AdaMerging's cost on the benchmark (issue 14): the time per step of the layer-wise (or
task-wise) optimisation on a quiet machine, in float32 and under bfloat16 autocast, and the
test score each learned λ gives.

    python benchmarks/adamerging_speed.py --benchmark full --precision bfloat16 --steps 500
    python benchmarks/adamerging_speed.py --benchmark full --precision float32 --steps 20

Each run is the benchmark's ``adamerging_layer`` row with that precision (λ cached under
``<cache>/adamerging/``; delete it to re-time). Results are appended to
``benchmarks/results/adamerging-speed-<benchmark>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from taskvec.bench.adamerging_rows import run_adamerging_row
from taskvec.bench.harness import Bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="full")
    parser.add_argument("--granularity", choices=("layer", "task"), default="layer")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    bench = Bench.open(args.benchmark, threads=args.threads, echo=print)
    label = f"adamerging_{args.granularity}"
    row = run_adamerging_row(bench, label, steps=args.steps, precision=args.precision, echo=print)
    entry = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_end": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "row": label,
        **{k: row[k] for k in ("parameters", "normalized", "acc", "cost", "seconds", "entropy")},
        "minutes_for_500_steps": round(row["cost"]["seconds_per_step"] * 500 / 60, 1),
    }
    print(json.dumps(entry, indent=1))
    path = RESULTS / f"adamerging-speed-{args.benchmark}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*runs, entry], indent=1) + "\n")


if __name__ == "__main__":
    main()
