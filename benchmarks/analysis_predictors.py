"""Is ``taskvec analyze`` useful? Do its pairwise numbers predict which experts merge badly?

On the benchmark's experts (``Bench.open(preset)``), for every pair of experts (a, b):

* the predictors from one ``taskvec analyze`` run over all experts: cosine, sign conflict, and
  the Jaccard overlap of the top-5 % and top-20 % magnitude masks;
* the outcome: task arithmetic of the two, θ = θ_0 + λ (τ_a + τ_b), with λ chosen on the
  validation split from a small grid, then scored once on the test split. Normalised accuracy
  = mean over t ∈ {a, b} of acc_merged(t) / acc_expert(t); the drop is 1 − that.

Then the Spearman rank correlation (scipy) between each predictor and the drop over the pairs
(with its two-sided p-value: a handful of pairs gives wide uncertainty). Scores are cached by
``bench.run``, so a rerun only merges what it has not scored.

    .venv/bin/python benchmarks/analysis_predictors.py [--preset full|lite]
        [--lambdas 0.3,0.5,0.7,1.0] [--pairs N] [--threads N]

Results: benchmarks/results/analysis-predictors.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from taskvec.analyze import analyze
from taskvec.bench.harness import Bench, Run

RESULTS = Path(__file__).resolve().parent / "results"
PREDICTORS = {
    "cosine": lambda p, a, b: p["cosine"][a][b],
    "sign conflict": lambda p, a, b: p["sign_conflict"][a][b],
    "Jaccard top-5 %": lambda p, a, b: p["top_k"]["0.05"]["jaccard"][a][b],
    "Jaccard top-20 %": lambda p, a, b: p["top_k"]["0.2"]["jaccard"][a][b],
}


def pair_config(a: str, b: str, lam: float) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"expert:{t}", "parameters": {"weight": 1.0}} for t in (a, b)],
        "parameters": {"lambda": lam},
    }


def pair_normalized(run: Run, tasks: tuple[str, str]) -> float:
    """Mean over the pair's two tasks of merged accuracy / expert accuracy."""
    ratios = [run.result.scores[t].accuracy / run.reference.scores[t].accuracy for t in tasks]
    return sum(ratios) / len(ratios)


def evaluate_pair(bench: Bench, a: str, b: str, lambdas: list[float]) -> dict[str, Any]:
    """λ by validation normalised accuracy (ties: the smaller λ), then the test score."""
    validation = {
        lam: pair_normalized(bench.run(pair_config(a, b, lam), split="validation"), (a, b))
        for lam in lambdas
    }
    best = max(lambdas, key=lambda lam: (validation[lam], -lam))
    test = bench.run(pair_config(a, b, best), split="test")
    normalized = pair_normalized(test, (a, b))
    return {
        "pair": [a, b],
        "lambda": best,
        "validation": validation,
        "test_normalized": normalized,
        "test_accuracy": {t: test.result.scores[t].accuracy for t in (a, b)},
        "drop": 1 - normalized,
    }


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    from scipy.stats import spearmanr

    drops = [r["drop"] for r in rows]
    out = {}
    for name in PREDICTORS:
        rho, p = spearmanr([r["predictors"][name] for r in rows], drops)
        out[name] = {"spearman": float(rho), "p_value": float(p)}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Do analysis numbers predict pairwise merge quality? ({result['preset']} preset)",
        "",
        f"Task arithmetic of each pair of the {len(result['tasks'])} experts "
        f"({', '.join(result['tasks'])}), λ ∈ {result['lambdas']} chosen on validation, "
        "test normalised accuracy over the pair's two tasks; drop = 1 − normalised accuracy.",
        "",
        "| pair | λ | test normalised | drop | " + " | ".join(PREDICTORS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(PREDICTORS),
    ]
    for r in sorted(result["pairs"], key=lambda r: -r["drop"]):
        values = " | ".join(f"{r['predictors'][n]:.4f}" for n in PREDICTORS)
        lines.append(
            f"| {' · '.join(r['pair'])} | {r['lambda']:g} | {r['test_normalized']:.4f} | "
            f"{r['drop']:.4f} | {values} |"
        )
    lines += [
        "",
        f"Spearman rank correlation with the drop over {len(result['pairs'])} pairs:",
        "",
        "| predictor | Spearman ρ | p-value |",
        "|---|---:|---:|",
    ]
    for name, c in result["correlations"].items():
        lines.append(f"| {name} | {c['spearman']:+.3f} | {c['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--lambdas", default="0.3,0.5,0.7,1.0")
    parser.add_argument("--pairs", type=int, default=None, help="Only the first N pairs.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default="", help="Suffix of the result files' names.")
    args = parser.parse_args()
    lambdas = [float(x) for x in args.lambdas.split(",")]
    start = time.perf_counter()
    bench = Bench.open(args.preset, threads=args.threads)
    tasks = bench.tasks
    experts = [bench.ref(f"expert:{t}") for t in tasks]
    analysis = analyze(
        bench.ref("base"), experts, names=tasks, threads=args.threads, progress=False
    )
    pairwise = analysis["pairwise"]
    pairs = list(itertools.combinations(range(len(tasks)), 2))[: args.pairs]
    rows = []
    for a, b in pairs:
        row = evaluate_pair(bench, tasks[a], tasks[b], lambdas)
        row["predictors"] = {n: f(pairwise, a, b) for n, f in PREDICTORS.items()}
        rows.append(row)
        print(f"{tasks[a]} · {tasks[b]}: λ={row['lambda']:g} drop {row['drop']:.4f}", flush=True)
    result = {
        "preset": args.preset,
        "tasks": tasks,
        "lambdas": lambdas,
        "pairs": rows,
        "correlations": correlations(rows) if len(rows) > 2 else {},
        "analysis_seconds": analysis["seconds"],
        "seconds": time.perf_counter() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"analysis-predictors{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
