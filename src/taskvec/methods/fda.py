"""``merge_method: fda`` as a pipeline method: its parameters, and its plan and run
(:mod:`taskvec.fda.config`, imported when a config uses it: torch.func only then)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.methods.params import Param
from taskvec.methods.pipeline import PipelineMethod, PipelinePlan
from taskvec.methods.registry import register_method

DOC = """θ* = θ₀ adapted block by block to fit every expert's outputs on its functional dual anchors

For each residual block and expert i, anchors X_i (synthetic inputs) are optimised so that
∇_θ S(X_i; θ)|θ₀ points along τ_i (S: cosine similarity of the block's outputs under θ and
θ_i); the block's parameters (`start: base`), or the coefficients of a starting merge's task
vectors (`start: task_arithmetic`, a method name such as `ties`, or a model folder, from
`scaling`), are then trained to match each expert's block outputs on its anchors. Runs forward
and backward passes (see docs/fda.md); writes a model with the base model's dtypes. Each task
is named after its model's folder; `anchor_dir` keeps the anchors (and reuses them).
Construction keys `anchors`, `tokens` (per anchor; unset: the family's default), `steps`,
`lr`, `init`, `sigma`, `seed` (default: `--random-seed`, else 0), `snapshots`; adaptation keys
`loss`, `adapt_lr`, `coef_lr`, `epochs`, `batch`."""

PARAMS = {
    "anchors": Param(64, "[1, inf)", integer=True),
    "tokens": Param(None, "[1, inf)", integer=True),
    "steps": Param(200, "[0, inf)", integer=True),
    "lr": Param(1e-2, "(0, inf)"),
    "init": Param("gauss", choices=("gauss", "weight")),
    "sigma": Param(0.01, "(0, inf)"),
    "seed": Param(0, integer=True),
    "snapshots": Param(0, "[0, inf)", integer=True),
    "loss": Param("mse", choices=("mse", "cos")),
    "adapt_lr": Param(5e-5, "(0, inf)"),
    "coef_lr": Param(1e-2, "(0, inf)"),
    "epochs": Param(125, "[0, inf)", integer=True),
    "batch": Param(128, "[1, inf)", integer=True),
    "start": Param("base", text=True),
    "scaling": Param(None),
    "anchor_dir": Param(None, text=True),
}


def _plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> PipelinePlan:
    from taskvec.fda.config import plan_fda

    return plan_fda(cfg, config_dir, seed)


def _run(plan: Any, out: Path, **options: Any) -> Path:
    from taskvec.fda.config import run_fda

    return run_fda(plan, out, **options)


FDA = PipelineMethod(
    "fda",
    DOC,
    _plan,
    _run,
    output="the adapted model",
    reference="Shi, Wen & Liu 2025, Model Merging with Functional Dual Anchors, arXiv 2510.21223",
    params=PARAMS,
)
register_method(FDA)
