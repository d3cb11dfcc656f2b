"""Twin-Merging on the benchmark (taskvec.bench.twin_row): test accuracy with every input routed
on its own, router task accuracy, bytes of factors, seconds per test batch routed vs θ* alone.

    .venv/bin/python benchmarks/twin.py --preset full            # → results/twin-full.json
    .venv/bin/python benchmarks/twin.py --preset lite --fraction 0.05

Latency is only meaningful on a quiet machine (torch threads: --threads, default 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from taskvec.bench.harness import Bench
from taskvec.bench.twin_row import run_twin
from taskvec.cli_params import method_parameters
from taskvec.twin.build import DEFAULT_FRACTION

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default=None, help="θ*'s merge method (default: TA)")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE of --method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench.open(args.preset, progress=False)
    params = method_parameters(tuple(args.param))
    row = run_twin(bench, fraction=args.fraction, method=args.method, parameters=params, echo=print)
    row["threads"] = args.threads
    suffix = "" if args.fraction == DEFAULT_FRACTION else f"-f{args.fraction}"
    suffix += f"-{args.method}" if args.method else ""
    out = RESULTS / f"twin-{args.preset}{suffix}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
