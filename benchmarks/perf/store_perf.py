"""Timings of the task-vector store on the 1.1B synthetic Llama (``make_models.py``).

Measures, each command in its own process (wall time and peak RSS from ``wait4``):

1. ``read``: reading one task vector τ₁ once through taskvec (every tensor, as ``store add``
   reads it) — the reference of target 1;
2. ``store add`` of τ₁ with int4 (target: ≤ 2× ``read``, peak RSS < 1.5 GB);
3. ``store equip`` of the base with three stored int4 vectors (λ = 0.3 each) and
   ``taskvec merge`` of today's task arithmetic on the base and the three fine-tunes
   (λ = 0.3), the reference of target 2 (≤ 1.5×).

The task vectors (``taskvec diff``) and the store are made once under ``--work``; the base is
hashed by ``diff``, so later fingerprint checks hit the cache. Results: printed, and
``benchmarks/results/store-perf-<date>.json``.

    .venv/bin/python benchmarks/perf/store_perf.py                 # the 1.1B models
    .venv/bin/python benchmarks/perf/store_perf.py --tiny           # seconds, 2 layers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKVEC = REPO / ".venv" / "bin" / "taskvec"
READ_ONCE = (
    "import sys, taskvec as tv\n"
    "t = tv.load(sys.argv[1])\n"
    "for n in t.names: t.ckpt.read(n).float()\n"
)


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; its wall seconds and peak RSS (GB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {"seconds": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=REPO / "benchmarks" / ".cache" / "models")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".cache" / "store-perf")
    p.add_argument("--tiny", action="store_true", help="2-layer models in --work, for a check")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from make_models import ModelSpec, generate

    models = args.work / "models" if args.tiny else args.models
    spec = ModelSpec(layers=2, hidden=256, intermediate=704, vocab=4000) if args.tiny else None
    base, *fts = generate(spec or ModelSpec(), models)
    env = {**os.environ, "TASKVEC_STORE": str(args.work / "store")}
    taus = []
    for i, ft in enumerate(fts, 1):
        tau = args.work / f"tau{i}"
        if not tau.exists():
            subprocess.run([str(TASKVEC), "diff", base, ft, tau, "--no-progress"], check=True)
        taus.append(tau)
    shutil.rmtree(args.work / "store", ignore_errors=True)
    for i, tau in enumerate(taus[1:], 2):  # the equip inputs; tv1 is added by the timed runs
        add = ["store", "add", f"tv{i}", tau, "--codec", "int4", "--base", base]
        subprocess.run([str(TASKVEC), *map(str, add)], env=env, check=True)
    config = args.work / "ta.yaml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {ft}\n    parameters: {{weight: 0.3}}\n" for ft in fts)
    )
    out = args.work / "out"
    runs: dict[str, list[dict[str, Any]]] = {}
    commands = {
        "read": [sys.executable, "-c", READ_ONCE, taus[0]],
        "store_add_int4": [
            TASKVEC,
            "store",
            "add",
            "tv1",
            taus[0],
            "--codec",
            "int4",
            "--base",
            base,
            "--replace",
        ],  # fmt: skip
        "equip_3_int4": [
            TASKVEC,
            "store",
            "equip",
            base,
            "tv1:0.3",
            "tv2:0.3",
            "tv3:0.3",
            "-o",
            out,
            "--overwrite",
            "--no-progress",
        ],  # fmt: skip
        "merge_task_arithmetic": [TASKVEC, "merge", config, out, "--overwrite", "--no-progress"],
    }
    for _ in range(args.repeats):
        for label, cmd in commands.items():
            runs.setdefault(label, []).append(timed([str(c) for c in cmd], env))
    shutil.rmtree(out, ignore_errors=True)
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    fastest = {k: r["seconds"] for k, r in best.items()}
    median = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result: dict[str, Any] = {"models": str(models), "runs": runs, "best": best, "median": median}
    for label, seconds in (("", fastest), ("_median", median)):
        result[f"add_over_read{label}"] = round(seconds["store_add_int4"] / seconds["read"], 2)
        result[f"equip_over_ta{label}"] = round(
            seconds["equip_3_int4"] / seconds["merge_task_arithmetic"], 2
        )
    print(json.dumps(result, indent=1))
    if not args.tiny:
        stamp = time.strftime("%Y-%m-%d-%H%M%S")
        path = REPO / "benchmarks" / "results" / f"store-perf-{stamp}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
