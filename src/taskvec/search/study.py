"""``taskvec search``: the coefficients of a merge config that maximise an objective, found by
Optuna's samplers, scored by long-lived workers (:mod:`taskvec.search.workers`).

Strategies (all Optuna's, no optimiser of our own): ``tpe`` (TPESampler), ``cmaes``
(CmaEsSampler, through the ``cmaes`` package), ``gp`` (GPSampler, Bayesian optimisation with a
Gaussian process), ``random``, ``grid`` (``grid_points`` evenly spaced values per range, log-
spaced for ``log: true``) and ``nsga2`` (NSGAIISampler, the genetic algorithm; with
``per_task`` every task's score is an objective and the result is a Pareto front). ``gradient``
(:mod:`taskvec.search.gradient`) is the one strategy that is not a sampler.

The study lives in ``OUT/study.db`` (Optuna's SQLite storage): ``resume`` continues an
interrupted search up to ``trials`` trials; a point already scored in the study is not scored
again. A point whose merge or objective fails marks its trial failed and the search goes on.
The test split (when the objective has one) is never seen during the search: the best point is
scored on it once, at the end (:mod:`taskvec.search.report`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from taskvec.errors import ConfigError, IncompatibleError
from taskvec.search.errors import SearchError
from taskvec.search.space import SearchSpace, search_space
from taskvec.search.workers import LocalPool, RayPool, Worker, WorkerSpec

log = logging.getLogger("taskvec")

SAMPLERS = ("tpe", "cmaes", "gp", "random", "grid", "nsga2")
STRATEGIES = (*SAMPLERS, "gradient")
STUDY_FILE = "study.db"
STUDY_NAME = "taskvec-search"


@dataclass(frozen=True)
class SearchSettings:
    """How to search: the strategy, the budget and where the work runs."""

    objective: str
    strategy: str = "tpe"
    trials: int = 50
    workers: int = 1
    address: str | None = None  # a Ray cluster; None: this machine
    threads: int | None = None  # torch threads per worker (default: cores / workers)
    seed: int = 0
    per_task: bool = False  # every metric an objective (a Pareto front)
    grid_points: int = 5
    resume: bool = False


def load_template(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A config with search markers, from a YAML file or a dict."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a merge config must be a YAML mapping")
    return loaded


def check_settings(settings: SearchSettings, space: SearchSpace) -> None:
    """One line for a strategy that cannot search this space."""
    if settings.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {settings.strategy!r}; one of {', '.join(STRATEGIES)}")
    if settings.trials < 1 or settings.workers < 1 or settings.grid_points < 2:
        raise ConfigError("trials and workers must be ≥ 1, grid points ≥ 2")
    if settings.per_task and settings.strategy in ("cmaes", "gp", "gradient"):
        raise ConfigError(f"strategy {settings.strategy} has one objective: drop --per-task")
    if settings.strategy == "grid" and space.simplex is not None:
        raise ConfigError("a grid cannot cover the simplex: use tpe, cmaes, gp or random")


def check_corners(worker: Worker) -> None:
    """Plan the config at both ends of every range (headers only): a value the method refuses
    (e.g. density 1.5) fails here, in one line, before any trial."""
    from taskvec.merge import plan_merge

    for side, values in zip(("low", "high"), worker.space.corners(), strict=True):
        plan = plan_merge(worker.config(values), random_seed=worker.spec.seed)
        if plan.problems:
            raise IncompatibleError(f"search range {side} end: {plan.problems[0]}")


def _grid(space: SearchSpace, points: int) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for d in space.dims:
        if d.choices is not None:
            grid[d.name] = list(d.choices)
            continue
        values = (
            np.geomspace(d.low, d.high, points) if d.log else np.linspace(d.low, d.high, points)
        )
        grid[d.name] = sorted({int(round(v)) for v in values}) if d.integer else values.tolist()
    return grid


def grid_size(settings: SearchSettings, space: SearchSpace) -> int | None:
    """How many points the grid strategy has (None for the other strategies)."""
    if settings.strategy != "grid":
        return None
    return math.prod(len(v) for v in _grid(space, settings.grid_points).values())


def _ask_tell_grid(grid: dict[str, list[Any]], seed: int) -> Any:
    """Optuna's GridSampler, minus its ``study.stop()`` once the grid is covered (which only
    works inside ``study.optimize``): the search stops there itself (:func:`grid_size`)."""
    import optuna

    class AskTellGrid(optuna.samplers.GridSampler):
        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            return None

    return AskTellGrid(grid, seed=seed)


def make_sampler(settings: SearchSettings, space: SearchSpace) -> Any:
    import optuna

    seed = settings.seed
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "grid": lambda: _ask_tell_grid(_grid(space, settings.grid_points), seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[settings.strategy]()


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's point: one value per dimension, and the simplex coordinates uᵢ ∈ [0, 1]."""
    values: dict[str, Any] = {}
    for d in space.dims:
        if d.choices is not None:
            values[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.integer:
            values[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log)
        else:
            values[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log)
    for name in space.simplex.names if space.simplex else ():
        values[name] = trial.suggest_float(name, 0.0, 1.0)
    return values


def _point_key(values: Mapping[str, Any]) -> str:
    return json.dumps({k: values[k] for k in sorted(values)}, sort_keys=True)


def open_study(out: Path, settings: SearchSettings, space: SearchSpace, metrics: list[str]) -> Any:
    """Create ``OUT/study.db``'s study, or with ``resume`` load it (the same config,
    objective and strategy, else one line)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = out / STUDY_FILE
    if db.exists() and not settings.resume:
        raise SearchError(
            f"{db} holds a search already: --resume continues it, or choose another -o"
        )
    if settings.resume and not db.exists():
        raise SearchError(f"{db}: nothing to resume (no study there)")
    identity = {
        "template": space.template,
        "objective": settings.objective,
        "strategy": settings.strategy,
        "per_task": settings.per_task,
    }
    directions = ["maximize"] * (len(metrics) if settings.per_task else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental-feature warnings
        study = optuna.create_study(
            storage=f"sqlite:///{db}",
            study_name=STUDY_NAME,
            load_if_exists=settings.resume,
            directions=directions,
            sampler=make_sampler(settings, space),
        )
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("metrics", metrics)
    elif json.dumps(stored, sort_keys=True) != json.dumps(identity, sort_keys=True):
        changed = [k for k in identity if json.dumps(stored.get(k)) != json.dumps(identity[k])]
        raise SearchError(f"{db}: --resume with a different {', '.join(changed)} than the study")
    return study


def _tell(
    study: Any,
    trial: Any,
    space: SearchSpace,
    result: Mapping[str, Any],
    metrics: list[str],
    per_task: bool,
    values: Mapping[str, Any],
) -> None:
    import optuna

    if "error" in result:
        trial.set_user_attr("error", result["error"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    for key in ("score", "metrics", "merge_seconds", "eval_seconds"):
        trial.set_user_attr(key, result[key])
    trial.set_user_attr("cached", bool(result.get("cached", False)))
    if space.simplex is not None:
        trial.set_user_attr("weights", space.weights(values))
    if per_task:
        study.tell(trial, [result["metrics"][m] for m in metrics])
    else:
        study.tell(trial, result["score"] - space.penalty(values))


def run_trials(
    study: Any,
    pool: LocalPool | RayPool,
    space: SearchSpace,
    settings: SearchSettings,
    metrics: list[str],
    *,
    progress: bool = True,
    echo: Callable[[str], None] = log.info,
) -> float:
    """Ask, score and tell until the study has ``trials`` finished trials; seconds taken."""
    import optuna

    states = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(stale.number, state=states.FAIL)  # left running by an interrupted search
    scored = {
        _point_key(t.params): {"score": t.user_attrs["score"], "metrics": t.user_attrs["metrics"]}
        for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    }
    done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL)))
    budget = settings.trials
    points = grid_size(settings, space)
    if points is not None and points < budget:
        echo(f"the grid has {points} points: {points} trials, not {budget}")
        budget = points
    bar = tqdm(total=budget, initial=done, desc="search", unit="trial", disable=not progress)
    start = time.perf_counter()
    running: dict[int, tuple[Any, dict[str, Any]]] = {}
    asked = done
    try:
        while done < budget:
            while asked < budget and len(running) < pool.size:
                trial = study.ask()
                values = suggest(trial, space)
                asked += 1
                hit = scored.get(_point_key(values))
                if hit is not None:  # this point was scored already: reuse its scores
                    _tell(
                        study,
                        trial,
                        space,
                        {**hit, "merge_seconds": 0.0, "eval_seconds": 0.0, "cached": True},
                        metrics,
                        settings.per_task,
                        values,
                    )
                    done += 1
                    bar.update()
                    continue
                running[trial.number] = (trial, values)
                pool.submit(trial.number, values)
            if not running:
                continue
            number, result = pool.next_done()
            trial, values = running.pop(number)
            _tell(study, trial, space, result, metrics, settings.per_task, values)
            if "error" in result:
                echo(f"trial {number} failed: {result['error']}")
            else:
                scored[_point_key(values)] = result
            done += 1
            bar.update()
            best = _best_value(study)
            if best is not None:
                bar.set_postfix(best=f"{best:.4f}", refresh=False)
    finally:
        bar.close()
    return time.perf_counter() - start


def _best_value(study: Any) -> float | None:
    try:
        if len(study.directions) == 1:
            return float(study.best_value)
        return max(float(np.mean(t.values)) for t in study.best_trials)
    except ValueError:  # no completed trial yet
        return None


def best_trial(study: Any) -> Any:
    """The best trial: the highest value, or on a Pareto front the highest mean."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise SearchError("no trial completed: every point failed (see the log lines above)")
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: float(np.mean(t.values)))


def make_pool(worker: Worker, settings: SearchSettings) -> LocalPool | RayPool:
    """One in-process worker, or Ray actors when several workers or a cluster are asked."""
    if settings.workers == 1 and settings.address is None:
        return LocalPool(worker)
    return RayPool(worker.spec, settings.workers, settings.address)


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def prepare(config: str | os.PathLike[str] | Mapping[str, Any], settings: SearchSettings) -> Worker:
    """Everything checked before any trial: the markers, the strategy, the objective (built
    here, once) and the config at both ends of every range."""
    template = load_template(config)
    space = search_space(template)
    check_settings(settings, space)
    threads = settings.threads or default_threads(settings.workers)
    worker = Worker(WorkerSpec(template, settings.objective, threads, settings.seed))
    check_corners(worker)
    return worker
