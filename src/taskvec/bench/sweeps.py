"""Which merges the benchmark runs, how their coefficients are chosen, and task negation.

Each :class:`Sweep` is one row of the results table: a method, fixed parameters and a grid.
Every grid point is merged and scored on the **validation** split; the point with the highest
normalised validation accuracy (ties: the earlier point in grid order) is merged again and
scored once on the **test** split, which is the reported number. A sweep with an empty grid is
scored on test only. Adding a method to the benchmark is one more line in :data:`SWEEPS`.

Negation (:func:`negate`) follows the task-arithmetic paper: θ₀ − λτ_t for increasing λ, keep the
largest λ for which every other task stays at ≥ 95 % of the base's validation accuracy, and
report how far the target task falls on test.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskvec.bench.harness import ALL_EXPERTS, BASE_REF, EXPERT_PREFIX, Bench, Run
from taskvec.bench.sources import BenchError

log = logging.getLogger("taskvec.bench")


@dataclass(frozen=True)
class Sweep:
    """A method with fixed ``parameters`` and a ``grid`` of values to choose on validation."""

    label: str
    method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    extend: bool = True  # False for a parameter with a hard range (e.g. a fraction in (0, 1])

    def points(self) -> list[dict[str, Any]]:
        """Every parameter set of the grid (the fixed parameters included), in grid order."""
        keys = list(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys)) if keys else [()]
        return [{**self.parameters, **dict(zip(keys, c, strict=True))} for c in combos]

    def config(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """A benchmark merge config (experts by name) with these top-level parameters.

        Methods without a base role (linear, karcher) get no ``base_model``: mergekit, and
        taskvec with it, would average the base in as one more model."""
        from taskvec.methods import get_method

        cfg: dict[str, Any] = {"merge_method": self.method}
        if get_method(self.method).base != "unused":
            cfg["base_model"] = BASE_REF
        cfg |= {"models": ALL_EXPERTS, "dtype": "float32"}
        if parameters:
            cfg["parameters"] = dict(parameters)
        return cfg


def _lam(*values: float) -> dict[str, tuple[float, ...]]:
    return {"lambda": values}


UNSCALED = (0.2, 0.3, 0.5)  # λ for sums of task vectors (6-7 experts; TA peaks ~0.3)
SCALED = (0.5, 1.0, 1.5)  # λ for methods that average the task vectors they keep
BREADCRUMBS = {"density": 0.89, "gamma": 0.01}  # the paper's β = 1 % outliers, γ = 10 % small

SWEEPS: tuple[Sweep, ...] = (
    Sweep("linear (average)", "linear"),
    Sweep("task_arithmetic", "task_arithmetic", grid=_lam(0.2, 0.3, 0.4, 0.5, 0.7, 1.0)),
    Sweep("ties", "ties", {"density": 0.2}, _lam(*SCALED)),
    Sweep("dare_ties", "dare_ties", {"density": 0.3}, _lam(*UNSCALED)),
    Sweep("breadcrumbs", "breadcrumbs", BREADCRUMBS, _lam(*UNSCALED)),
    Sweep("della", "della", {"density": 0.4, "epsilon": 0.1}, _lam(*SCALED)),
    Sweep("model_stock", "model_stock", grid={"filter_wise": (False, True)}),
    Sweep("consensus", "consensus", {"k": 2, "tall_lambda": 0.6}, _lam(*UNSCALED)),
    Sweep("magmax", "magmax", grid=_lam(0.5, 0.7, 1.0)),
    Sweep("pcb", "pcb", {"pcb_ratio": 0.1}, _lam(*SCALED)),
    Sweep("gram_schmidt", "gram_schmidt", grid=_lam(0.3, 0.5, 1.0)),
    Sweep("tsv", "tsv", grid={"alpha": (0.3, 0.5, 1.0)}),
    Sweep("iso_c", "iso_c", grid={"alpha": SCALED}),
    Sweep("iso_cts", "iso_cts", {"common_space_fraction": 0.8}, {"alpha": SCALED}),
    Sweep("wudi", "wudi", {"steps": 300, "lr": 1e-5, "step_tol": 0.1}),
    Sweep("wudi_exact", "wudi", {"steps": 300, "lr": 1e-5, "step_tol": 0.0}),
    Sweep("ram", "ram"),
    Sweep("ramplus_tl", "ramplus_tl"),
    Sweep("karcher", "karcher"),
    Sweep("multislerp", "multislerp"),
    Sweep("sce", "sce", grid={"select_topk": (0.1, 1.0)}, extend=False),
    Sweep("dare_linear", "dare_linear", {"density": 0.3}, _lam(*UNSCALED)),
    Sweep("breadcrumbs_ties", "breadcrumbs_ties", BREADCRUMBS, _lam(*UNSCALED)),
    Sweep("della_linear", "della_linear", {"density": 0.4, "epsilon": 0.1}, _lam(*UNSCALED)),
)
"""The merges of the full benchmark. Methods that take one or two models (slerp, nuslerp,
nearswap, arcee_fusion, passthrough) have no row: the benchmark merges all its experts at once."""

SELECTION_RULE = (
    "highest mean normalised accuracy on the validation split over the grid (ties: the smaller "
    "value); a one-parameter grid whose best point is at an edge is extended past it (up to 4 "
    "steps); test is scored once, for the chosen point"
)


def available(sweeps: Sequence[Sweep] = SWEEPS) -> tuple[list[Sweep], list[str]]:
    """The sweeps whose method is registered and takes the sweep's parameters, and the labels
    (with the reason) of those that cannot run (yet)."""
    from taskvec.methods import all_methods

    known = all_methods()
    have, missing = [], []
    for s in sweeps:
        method = known.get(s.method)
        if method is None:
            missing.append(f"{s.label} (no method {s.method!r} yet)")
            continue
        accepted = {*method.per_model, *method.globals}
        unknown = sorted({*s.parameters, *s.grid} - accepted)
        if unknown:
            missing.append(f"{s.label} ({s.method} takes no {', '.join(unknown)})")
            continue
        have.append(s)
    return have, missing


@dataclass(frozen=True)
class SweepOutcome:
    sweep: Sweep
    validation: list[Run]  # one per grid point (empty when there is no grid)
    chosen: dict[str, Any]
    test: Run
    points: list[dict[str, Any]] = field(default_factory=list)  # the grid as evaluated

    def to_json(self) -> dict[str, Any]:
        """The results-JSON entry: the issue's keys, then extras (standard errors, selection)."""
        t = self.test
        return {
            "method": self.sweep.method,
            "parameters": self.chosen,
            "acc": {k: round(s.accuracy, 4) for k, s in t.result.scores.items()},
            "avg": round(t.result.average, 4),
            "normalized": round(t.normalized, 4),
            "seconds": round(t.merge_seconds, 1),
            "stderr": {k: round(s.stderr, 4) for k, s in t.result.scores.items()},
            "avg_stderr": round(t.result.average_stderr, 4),
            "normalized_stderr": round(t.normalized_stderr, 4),
            "eval_seconds": round(t.eval_seconds, 1),
            "selection": {
                "rule": SELECTION_RULE if self.validation else "no coefficient to choose",
                "grid": {k: [p[k] for p in self.points] for k in self.sweep.grid},
                "extended": any(p not in self.sweep.points() for p in self.points),
                "validation": [
                    {
                        "parameters": {k: p[k] for k in self.sweep.grid},
                        "normalized": round(r.normalized, 4),
                        "avg": round(r.result.average, 4),
                    }
                    for p, r in zip(self.points, self.validation, strict=True)
                ],
            },
        }


MAX_EXTENSIONS = 4


def extend_grid(values: Sequence[float], best: int) -> float | None:
    """The next value past the edge of a sorted numeric grid whose ``best`` is at that edge:
    one more step of the last spacing above the top, one below the bottom (halving toward 0
    instead of reaching it); None when ``best`` is inside the grid or the bottom is 0."""
    if len(values) < 2 or 0 < best < len(values) - 1:
        return None
    if best == len(values) - 1:
        return round(values[-1] + (values[-1] - values[-2]), 6)
    if values[0] <= 0:
        return None
    lower = values[0] - (values[1] - values[0])
    return round(lower if lower > 0 else values[0] / 2, 6)


def run_sweep(
    bench: Bench, sweep: Sweep, *, echo: Callable[[str], None] = lambda s: None
) -> SweepOutcome:
    """Choose ``sweep``'s grid point on validation, then score it on test.

    A one-parameter numeric grid whose best point is at an edge is extended past that edge
    (:func:`extend_grid`, at most :data:`MAX_EXTENSIONS` times), so the choice is never an
    artefact of where the grid stopped."""
    runs: dict[Any, Run] = {}

    def score(p: dict[str, Any]) -> Run:
        key = tuple(sorted((k, p[k]) for k in sweep.grid))
        if key not in runs:
            run = bench.run(sweep.config(p), split="validation", label=f"{sweep.label} {p}")
            runs[key] = run
            echo(
                f"    {sweep.label} {_fmt(p, sweep.grid)}: validation normalised "
                f"{run.normalized:.4f} ({run.merge_seconds:.0f} s merge, "
                f"{run.eval_seconds:.0f} s eval)"
            )
        return runs[key]

    points = sweep.points()
    validation: list[Run] = []
    if sweep.grid:
        key = next(iter(sweep.grid))
        numeric = (
            sweep.extend
            and len(sweep.grid) == 1
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in sweep.grid[key])
        )
        if numeric:
            points.sort(key=lambda p: p[key])
        for _ in range(MAX_EXTENSIONS + 1):
            validation = [score(p) for p in points]
            best = max(range(len(points)), key=lambda i: (validation[i].normalized, -i))
            nxt = extend_grid([p[key] for p in points], best) if numeric else None
            if nxt is None:
                break
            points.insert(0 if best == 0 else len(points), {**points[best], key: nxt})
        else:
            validation = [score(p) for p in points]
            best = max(range(len(points)), key=lambda i: (validation[i].normalized, -i))
        chosen = points[best]
    else:
        chosen = points[0]
    test = bench.run(sweep.config(chosen), split="test", label=sweep.label)
    echo(
        f"  {sweep.label} {_fmt(chosen, sweep.grid)}: test normalised {test.normalized:.4f} "
        f"± {test.normalized_stderr:.4f}, avg {100 * test.result.average:.1f}"
    )
    return SweepOutcome(sweep, validation, chosen, test, points if sweep.grid else [])


def _fmt(params: Mapping[str, Any], grid: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={params[k]}" for k in grid)


# --- negation ----------------------------------------------------------------------------------

NEGATION_LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)
CONTROL_RATIO = 0.95


def negation_config(task: str, lam: float) -> dict[str, Any]:
    """θ₀ − λ τ_task as a task_arithmetic config."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": BASE_REF,
        "models": [{"model": f"{EXPERT_PREFIX}{task}", "parameters": {"weight": -1.0}}],
        "parameters": {"lambda": lam},
        "dtype": "float32",
    }


def negate(
    bench: Bench,
    task: str,
    *,
    lambdas: Sequence[float] = NEGATION_LAMBDAS,
    ratio: float = CONTROL_RATIO,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Negate ``task``'s expert: the largest λ (of ``lambdas``, ascending, stopping at the first
    that fails) keeping every other task at ≥ ``ratio`` × the base's validation accuracy."""
    if task not in bench.tasks:
        raise BenchError(f"no task {task!r} to negate")
    base_val = bench.evaluate(bench.built.base, split="validation", label="base")
    base_test = bench.evaluate(bench.built.base, split="test", label="base")
    others = [t for t in bench.tasks if t != task]
    tried = []
    chosen = 0.0
    for lam in sorted(lambdas):
        run = bench.run(negation_config(task, lam), split="validation", label=f"−{lam:g}τ_{task}")
        worst = min(run.result.scores[t].accuracy / base_val.scores[t].accuracy for t in others)
        ok = worst >= ratio
        tried.append(
            {
                "lambda": lam,
                "target": round(run.result.scores[task].accuracy, 4),
                "control_min_ratio": round(worst, 4),
                "ok": ok,
            }
        )
        if not ok:
            break
        chosen = lam
    if chosen == 0.0:
        result, seconds = base_test, 0.0
    else:
        test = bench.run(negation_config(task, chosen), split="test", label=f"−{chosen:g}τ_{task}")
        result, seconds = test.result, test.merge_seconds
    target_base = base_test.scores[task].accuracy
    target = result.scores[task].accuracy
    control = {
        t: round(result.scores[t].accuracy / base_test.scores[t].accuracy, 4) for t in others
    }
    out = {
        "lambda": chosen,
        "target_base": round(target_base, 4),
        "target": round(target, 4),
        "drop_points": round(100 * (target_base - target), 2),
        "target_stderr": round(result.scores[task].stderr, 4),
        "chance": round(1 / len(bench.built.experts[task].head.classes), 4),
        "control_ratio": control,
        "control_min_ratio": min(control.values()) if control else 1.0,
        "acc": {t: round(s.accuracy, 4) for t, s in result.scores.items()},
        "seconds": round(seconds, 1),
        "validation": tried,
    }
    echo(
        f"  negate {task}: λ={chosen:g}, {100 * target_base:.1f} -> {100 * target:.1f} "
        f"({out['drop_points']:+.1f} points drop), others ≥ {out['control_min_ratio']:.3f} of base"
    )
    return out
