"""Coefficient search on the benchmark (issue 15): per-task weights of task arithmetic and
TIES found by TPE and CMA-ES, the gradient strategy, and the speed-up of two Ray workers.

    python benchmarks/search_bench.py --benchmark full --runs ta-tpe ta-cmaes ties-tpe
    python benchmarks/search_bench.py --benchmark full --runs workers-1 workers-2  # speed-up

Each run is an ordinary ``taskvec search`` (validation split only; the best point is scored on
test once), its study kept under ``<cache>/search/<benchmark>/<run>`` so an interrupted run
resumes. The summary goes to ``benchmarks/results/search-<benchmark>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import optuna

from taskvec.bench.harness import Bench
from taskvec.search import SearchSettings, run_search
from taskvec.search.study import STUDY_NAME

RESULTS = Path(__file__).resolve().parent / "results"


def per_task_weights(method: str, tasks: list[str], high: float, **parameters: Any) -> dict:
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [
            {"model": f"expert:{t}", "parameters": {"weight": {"search": [0.0, high]}}}
            for t in tasks
        ],
        "parameters": parameters,
        "dtype": "float32",
    }


def layer_weights(tasks: list[str], high: float) -> dict:
    """Task arithmetic with a 2-point per-layer gradient of weights per task (first and last
    layer searched, the layers between interpolated)."""
    marker = {"search": [0.0, high]}
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": f"expert:{t}", "parameters": {"weight": [dict(marker), dict(marker)]}}
            for t in tasks
        ],
        "dtype": "float32",
    }


def runs(tasks: list[str]) -> dict[str, tuple[dict, dict[str, Any]]]:
    """name -> (config, search settings) of every run this script knows."""
    ta = per_task_weights("task_arithmetic", tasks, 1.0)
    ties = per_task_weights("ties", tasks, 1.5, density=0.2)
    return {
        "ta-tpe": (ta, {"strategy": "tpe", "trials": 60}),
        "ta-cmaes": (ta, {"strategy": "cmaes", "trials": 60}),
        "ties-tpe": (ties, {"strategy": "tpe", "trials": 60}),
        "ties-cmaes": (ties, {"strategy": "cmaes", "trials": 60}),
        "ta-gradient": (ta, {"strategy": "gradient", "trials": 200}),
        "ta-layer-tpe": (layer_weights(tasks, 1.0), {"strategy": "tpe", "trials": 60}),
        # a seed each: points the other run scored would come from the evaluation cache
        "workers-1": (ta, {"strategy": "random", "trials": 16, "workers": 1, "seed": 101}),
        "workers-2": (ta, {"strategy": "random", "trials": 16, "workers": 2, "seed": 202}),
    }


def steady_rate(db: Path) -> float:
    """Trials per hour from the first trial's start to the last one's end: the search loop
    alone, without loading the workers or scoring the best point on test."""
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.datetime_complete is not None]
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return round(len(done) / span.total_seconds() * 3600, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="full", choices=("lite", "full"))
    ap.add_argument("--runs", nargs="+", default=["ta-tpe", "ta-cmaes"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    bench = Bench.open(a.benchmark, threads=a.threads, progress=False, echo=lambda s: None)
    known = runs(bench.tasks)
    root = bench.built.root / "search" / a.benchmark
    summary_path = RESULTS / f"search-{a.benchmark}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("runs", {})
    summary["benchmark"], summary["tasks"] = a.benchmark, bench.tasks
    for name in a.runs:
        config, options = known[name]
        options = {"threads": a.threads, **options}
        out = root / name
        settings = SearchSettings(
            objective=f"bench:{a.benchmark}", resume=(out / "study.db").exists(), **options
        )
        start, cpu = time.perf_counter(), time.process_time()
        report = run_search(config, out, settings, progress=False, echo=print)
        summary["runs"][name] = {
            "config": config,
            "settings": options,
            "best": report["best"],
            "completed": report["completed"],
            "failed": report["failed"],
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds_driver": round(time.process_time() - cpu, 1),
            "trials_per_hour": report["trials_per_hour"],
            "steady_trials_per_hour": steady_rate(out / "study.db"),
            "mean_merge_seconds": report["mean_merge_seconds"],
            "mean_eval_seconds": report["mean_eval_seconds"],
            "peak_rss_gb_driver": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2
            ),
            "load_average": os.getloadavg()[0],
            "folder": str(out),
        }
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"{name}: validation {report['best']['validation']['score']:.4f}, test "
            f"{(report['best']['test'] or {}).get('score', float('nan')):.4f}"
        )
    write_markdown(summary, summary_path.with_suffix(".md"))


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Coefficient search on the {summary['benchmark']} benchmark",
        "",
        "| run | strategy | trials | validation (normalised) | test (normalised) | "
        "trials / hour | steady trials / hour | merge s | eval s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in summary["runs"].items():
        test = (r["best"]["test"] or {}).get("score")
        lines.append(
            f"| {name} | {r['settings']['strategy']} | {r['completed']} | "
            f"{r['best']['validation']['score']:.4f} | "
            f"{'' if test is None else f'{test:.4f}'} | {r['trials_per_hour']} | "
            f"{r.get('steady_trials_per_hour', '')} | "
            f"{r['mean_merge_seconds']} | {r['mean_eval_seconds']} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
