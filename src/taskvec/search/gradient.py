"""The gradient strategy: the per-model weights of a ``task_arithmetic`` or ``linear`` config
learned by Adam through the model, for models that fit in memory.

θ(w) = θ₀ + Σᵢ wᵢ τᵢ (task arithmetic: w = λ·weight; linear on the simplex: θ = Σᵢ αᵢ θᵢ =
θ₀ + Σᵢ αᵢ τᵢ since Σᵢ αᵢ = 1). The loss is the objective's cross-entropy on labelled
VALIDATION batches (one per task per step); ∂L/∂wᵢ = ⟨∂L/∂θ, τᵢ⟩ as in
:func:`taskvec.adamerging.adamerging`, which runs the loop. After each Adam step w goes back
into its ranges (each marker's [low, high]), or onto the simplex by the Euclidean projection of
Duchi et al. (ICML 2008): w = max(v − θ, 0) with θ chosen so that Σ w = 1. ``trials`` is the
number of steps. Only the benchmark's objective is differentiable here (``bench:...``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from taskvec.adamerging import AdaSettings, adamerging
from taskvec.errors import ConfigError
from taskvec.search.objectives import BenchObjective
from taskvec.search.study import SearchSettings
from taskvec.search.workers import Worker

LR = 1e-2
BATCH = 16


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Each column of ``v`` projected onto {w ≥ 0, Σ w = 1} (Euclidean; Duchi et al. 2008)."""
    u, _ = torch.sort(v, dim=0, descending=True)
    css = u.cumsum(0) - 1
    k = torch.arange(1, v.shape[0] + 1, dtype=v.dtype).unsqueeze(1)
    support = (u - css / k) > 0
    rho = support.to(v.dtype).cumsum(0).argmax(0, keepdim=True)  # last index still in support
    theta = css.gather(0, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0)


def _weight_dims(worker: Worker) -> tuple[list[str], list[tuple[float, float]], float]:
    """The searched name, range of each model's weight, and the fixed scale λ; one line for a
    space the gradient cannot follow."""
    space = worker.space
    template = space.template
    method = template.get("merge_method")
    if method not in ("task_arithmetic", "linear"):
        raise ConfigError(
            f"the gradient strategy learns task_arithmetic / linear weights, not {method}"
        )
    models = template.get("models") or []
    if space.simplex is not None:
        if space.dims or space.simplex.parameter != "weight":
            raise ConfigError("the gradient strategy searches the weights alone (simplex: weight)")
        return list(space.simplex.names), [(0.0, 1.0)] * len(models), 1.0
    if method == "linear":
        raise ConfigError(
            "gradient on linear needs its weights on the simplex: search: {simplex: weight}"
        )
    by_model = {d.path[1]: d for d in space.dims if d.path[2:] == ("parameters", "weight")}
    if len(by_model) != len(space.dims) or set(by_model) != set(range(len(models))):
        raise ConfigError("the gradient strategy searches one `weight` per model and nothing else")
    if any(d.choices is not None or d.integer or d.log for d in space.dims):
        raise ConfigError("the gradient strategy needs plain [low, high] weight ranges")
    scale = (template.get("parameters") or {}).get("lambda", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or scale == 0:
        raise ConfigError("the gradient strategy needs a fixed, non-zero scalar lambda")
    dims = [by_model[i] for i in range(len(models))]
    return [d.name for d in dims], [(d.low, d.high) for d in dims], float(scale)


def _ranges(
    bounds: list[tuple[float, float]], scale: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    low = torch.tensor([lo * scale for lo, _ in bounds], dtype=torch.float64).unsqueeze(1)
    high = torch.tensor([hi * scale for _, hi in bounds], dtype=torch.float64).unsqueeze(1)
    return lambda lam: torch.maximum(torch.minimum(lam, high.maximum(low)), low.minimum(high))


def run_gradient(
    worker: Worker,
    settings: SearchSettings,
    out: Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Learn the weights; the point found (as search values), its validation scores and the
    loss curve."""
    from taskvec.bench.encoder_merge import encoder_merge, split_batches, step_loss

    objective = worker.objective
    if not isinstance(objective, BenchObjective):
        raise ConfigError("the gradient strategy needs a differentiable objective: bench:<preset>")
    names, bounds, scale = _weight_dims(worker)
    bench = objective.bench
    expected = [str(bench.built.experts[t].path) for t in bench.tasks]
    config = worker.config(worker.space.corners()[0])
    if [m["model"] for m in config["models"]] != expected:
        raise ConfigError(
            "the gradient strategy merges the benchmark's experts in order: "
            + ", ".join(bench.tasks)
        )
    simplex = worker.space.simplex is not None
    torch.manual_seed(settings.seed)
    merge = encoder_merge(bench)
    data = split_batches(bench, "validation", BATCH, random.Random(settings.seed))
    loss = step_loss(merge, data, torch.nn.functional.cross_entropy)
    init = 1.0 / len(names) if simplex else sum(lo + hi for lo, hi in bounds) / (2 * len(bounds))
    project = project_simplex if simplex else _ranges(bounds, scale)
    echo(f"gradient: {settings.trials} Adam steps (lr {LR}) on validation cross-entropy")
    result = adamerging(
        merge.encoder,
        merge.theta0,
        merge.vectors,
        loss,
        AdaSettings("task", settings.trials, LR, init * scale, clamp=False),
        progress=progress,
        project=project,
    )
    w = result.coefficients[:, 0]
    if simplex:  # u with weights(u) = w: eᵢ = −log(1 − uᵢ) = wᵢ
        values = {n: 1.0 - math.exp(-float(wi)) for n, wi in zip(names, w, strict=True)}
    else:
        values = {n: float(wi) / scale for n, wi in zip(names, w, strict=True)}
    scored = worker.evaluate(values)
    if "error" in scored:
        raise ConfigError(f"the point found cannot be scored: {scored['error']}")
    row = {
        "number": 0,
        "state": "complete",
        "params": values,
        "values": [scored["score"]],
        **scored,
        "losses": [round(v, 5) for v in result.losses],
    }
    return {
        "values": values,
        "validation": {"score": scored["score"], "metrics": scored["metrics"]},
        "trials": [row],
        "extra": {"steps": settings.trials, "lr": LR, "batch_per_task": BATCH, "plots": []},
    }
