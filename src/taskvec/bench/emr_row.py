"""The benchmark's EMR-merging row: one unified task vector plus per-task masks and scales
(Huang et al. 2024), so every task is scored with its own modulated model, not one merge.

θ_t = θ0 + λ_t · M_t ⊙ τ_uni is built from the experts' task vectors with
:func:`taskvec.emr.emr_merge`, materialised per task, and scored on that task only (test
split; EMR has no coefficient to choose, so validation is not used).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

from taskvec.algebra import load_model
from taskvec.bench.evaluate import combine
from taskvec.bench.harness import Bench, Run
from taskvec.bench.results import summary_row
from taskvec.emr import emr_merge, emr_task_vector

LABEL = "emr"


def run_emr(bench: Bench, *, echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Score EMR-merging of every expert on the test split; the results-JSON entry."""
    built = bench.built
    base = load_model(built.base)
    work = bench.scratch / "emr"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results, eval_seconds = [], 0.0
    try:
        start = time.perf_counter()
        vectors = {t: load_model(built.experts[t].path) - base for t in bench.tasks}
        emr_merge(vectors, work / "emr", overwrite=True, threads=built.threads, progress=False)
        merge_seconds = time.perf_counter() - start
        for task in bench.tasks:
            model = work / task
            (base + emr_task_vector(work / "emr", task)).save(
                model, threads=built.threads, progress=False
            )
            mark = time.perf_counter()
            results.append(
                built.evaluator.evaluate(
                    model, {task: built.heads[task]}, split="test", label=f"emr {task}"
                )
            )
            eval_seconds += time.perf_counter() - mark
            shutil.rmtree(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run = Run(
        LABEL,
        "emr",
        {},
        "test",
        combine(results),
        built.reference("test"),
        merge_seconds,
        eval_seconds,
    )
    echo(f"  emr: test normalised {run.normalized:.4f} ± {run.normalized_stderr:.4f}")
    return {
        "method": "emr",
        "parameters": {},
        **summary_row(run.result, run.reference),
        "seconds": round(merge_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "selection": {
            "rule": "no coefficient to choose: EMR computes each task's mask and scale; each "
            "task is scored with its own modulated model (unlike every other row)"
        },
    }
