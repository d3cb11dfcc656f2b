"""``merge_method: pleas`` and ``permute`` as pipeline methods: two or more MLP stack folders
(:mod:`taskvec.pleas.folder`) from any initialisations, no base model, each model's ``data:``
a ``.npy`` of unlabelled inputs (all of them pooled for matching and the least squares).
More than two models are merged in order, ``merge(merge(m1, m2), m3)…`` (``pleas`` then only
at budget 1: a widened merge no longer matches the next model's shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskvec.config import MergeConfig
from taskvec.errors import ConfigError, TaskvecError
from taskvec.methods.pipeline import DataPlan, PipelineMethod
from taskvec.pleas.baselines import permute_average
from taskvec.pleas.folder import data_shape, load_data, load_stack, save_stack, stack_shapes
from taskvec.pleas.solve import pleas_merge


@dataclass
class StackPlan(DataPlan):
    """A checked ``pleas`` / ``permute`` config (no base: ``base`` is empty)."""

    method: str = "pleas"

    def lines(self) -> list[str]:
        return [
            *(f"model {t}: {self.experts[t]} (data {self.data[t]})" for t in self.experts),
            "settings: " + (", ".join(f"{k}={v}" for k, v in self.options.items()) or "none"),
        ]


def plan_stacks(method: PipelineMethod, cfg: MergeConfig, config_dir: Path | None) -> StackPlan:
    """Headers only: every model an MLP stack of one architecture, every data file a
    ``[n>0, in]`` array."""
    _, models = method.inputs(cfg, config_dir)
    options = {k: p.default for k, p in method.params.items()}
    options |= method.checked(method.given(cfg.parameters), len(models))
    plan = StackPlan("", models, method.data(cfg, config_dir), options, method=method.name)
    if options.get("budget", 1.0) > 1.0 and len(models) > 2:
        raise ConfigError(f"{method.name} with budget > 1 merges exactly two models")
    shapes: dict[str, list[tuple[int, int]]] = {}
    for task, folder in models.items():
        try:
            shapes[task] = stack_shapes(folder)
        except TaskvecError as e:
            plan.problems.append(str(e))
    if len({str(s) for s in shapes.values()}) > 1:
        plan.problems.append(
            "models differ in architecture: "
            + "; ".join(f"{t} {[w[::-1] for w in s]}" for t, s in shapes.items())
        )
    n_in = next(iter(shapes.values()))[0][1] if shapes else None
    for task, source in plan.data.items():
        try:
            shape = data_shape(source)
        except TaskvecError as e:
            plan.problems.append(f"task {task}: {e}")
            continue
        if len(shape) != 2 or shape[0] == 0 or (n_in is not None and shape[1] != n_in):
            plan.problems.append(f"task {task}: data {source} is {list(shape)}, not [n>0, {n_in}]")
    return plan


def run_stacks(plan: StackPlan, out: Path, *, overwrite: bool = False, **_: Any) -> Path:
    """Load, merge in order, write an MLP stack folder (float32)."""
    files = dict.fromkeys(plan.data.values())  # a file named by several models counts once
    x = np.concatenate([load_data(p) for p in files])
    stacks = [load_stack(f) for f in plan.experts.values()]
    merged = stacks[0]
    for other in stacks[1:]:
        if plan.method == "pleas":
            merged = pleas_merge(merged, other, x, **plan.options)
        else:
            merged = permute_average(merged, other, x)
    producer = {"operation": "merge", "method": plan.method, "models": plan.experts}
    return save_stack(merged, out, overwrite=overwrite, producer=producer, dtype=torch.float32)
