"""``run_search``: check everything, search, score the best point once on held-out data, and
write the outputs (see :mod:`taskvec.search.study` and :mod:`taskvec.search.report`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from taskvec.errors import ConfigError
from taskvec.search.report import trial_rows, write_best_config, write_plots, write_report
from taskvec.search.study import (
    SearchSettings,
    best_trial,
    make_pool,
    open_study,
    prepare,
    run_trials,
)

log = logging.getLogger("taskvec")


def run_search(
    config: str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str],
    settings: SearchSettings,
    *,
    save_model: str | os.PathLike[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Search the coefficients of ``config`` (a YAML file or dict with ``{search: ...}``
    markers) into the folder ``out``; returns the report (also ``out/report.json``)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    worker = prepare(config, settings)  # every check that needs no trial
    metrics = list(worker.objective.metrics) if settings.per_task else ["score"]
    if settings.per_task and len(metrics) < 2:
        raise ConfigError(
            f"objective {settings.objective} names no per-task scores (a callable declares them "
            "as function.metrics = (...)): drop --per-task"
        )
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if settings.strategy == "gradient":
        from taskvec.search.gradient import run_gradient

        found = run_gradient(worker, settings, out, progress=progress, echo=echo)
        trials: list[dict[str, Any]] = found["trials"]
        best_values, validation = found["values"], found["validation"]
        extra = found["extra"]
    else:
        study = open_study(out, settings, worker.space, metrics)
        pool = make_pool(worker, settings)
        try:
            seconds = run_trials(
                study, pool, worker.space, settings, metrics, progress=progress, echo=echo
            )
        finally:
            pool.close()
        best = best_trial(study)
        best_values = best.params
        validation = {"score": best.user_attrs["score"], "metrics": best.user_attrs["metrics"]}
        trials = trial_rows(study)
        extra = {
            "plots": write_plots(out, study, len(worker.space.names)),
            "search_seconds_this_run": round(seconds, 1),
        }
    config_out = worker.config(best_values)
    test = worker.test(best_values)  # the held-out split, seen once
    finished = [t for t in trials if t["state"] == "complete"]
    elapsed = time.perf_counter() - start
    report = {
        "objective": settings.objective,
        "strategy": settings.strategy,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "objective"},
        "dimensions": worker.space.names,
        "best": {
            "values": best_values,
            "weights": worker.space.weights(best_values) or None,
            "validation": validation,
            "test": test,
        },
        "trials": trials,
        "completed": len(finished),
        "failed": sum(t["state"] == "fail" for t in trials),
        "cached": sum(bool(t.get("cached")) for t in finished),
        "seconds": round(elapsed, 1),
        "trials_per_hour": round(len(trials) / elapsed * 3600, 1) if trials else 0.0,
        "mean_merge_seconds": _mean(t.get("merge_seconds") for t in finished),
        "mean_eval_seconds": _mean(t.get("eval_seconds") for t in finished),
        **extra,
    }
    header = [
        f"found by taskvec search ({settings.strategy}, objective {settings.objective})",
        f"validation score {validation['score']:.4f}"
        + (f", test score {test['score']:.4f}" if test else ""),
    ]
    write_best_config(out, config_out, header)
    write_report(out, report)
    echo(
        f"best validation score {validation['score']:.4f}"
        + (f", test {test['score']:.4f}" if test else "")
        + f"; config in {out / 'best.yaml'}"
    )
    if save_model is not None:
        import taskvec

        taskvec.merge(config_out, save_model, random_seed=settings.seed, progress=progress)
        echo(f"merged the best config into {save_model}")
    return report


def _mean(values: Any) -> float | None:
    got = [float(v) for v in values if v is not None]
    return round(sum(got) / len(got), 3) if got else None
