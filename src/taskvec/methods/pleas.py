"""Registers ``pleas`` and ``permute``: merging MLP stacks from different initialisations
(:mod:`taskvec.pleas`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.methods.params import Param
from taskvec.methods.pipeline import PipelineMethod, PipelinePlan
from taskvec.methods.registry import register_method

PLEAS_DOC = """W_l = argmin ‖[H_m, 1] Wᵀ − Y_l‖² + λ‖W‖², matched units merged, layer by layer

Models trained from different initialisations, no base model. Per hidden layer, units are
matched by activation correlation (linear_sum_assignment); under `budget` b the layer keeps
round(b·d) units (d ≤ · ≤ 2d): the 2d − round(b·d) best-correlated pairs merge, the others are
kept from both models. Each merged layer is fitted by least squares on the pooled `data:`
inputs (.npy arrays) to the average of the matched pre-activations (a kept unit: its own),
the logits to the models' mean logits; λ = `ridge`·n. Models are MLP stack folders
(model.safetensors with layers.<i>.weight/bias, mlp.json); the output is one."""

PERMUTE_DOC = """θ = (θ_A + π(θ_B)) / 2: activation matching, then averaging (Git Re-Basin)

Models trained from different initialisations, no base model: each hidden layer's units of
the next model are permuted to the merged model's by activation correlation on the pooled
`data:` inputs (.npy), then the weights are averaged. Models and output: MLP stack folders."""


def _plan(name: str) -> Any:
    def plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> PipelinePlan:
        from taskvec.methods.registry import get_method
        from taskvec.pleas.method import plan_stacks

        method = get_method(name)
        assert isinstance(method, PipelineMethod)
        return plan_stacks(method, cfg, config_dir)

    return plan


def _run(plan: Any, out: Path, **options: Any) -> Path:
    from taskvec.pleas.method import run_stacks

    return run_stacks(plan, out, **options)


def _register(name: str, doc: str, reference: str, params: dict[str, Param]) -> None:
    method = PipelineMethod(
        name,
        doc,
        _plan(name),
        _run,
        output="an MLP stack folder",
        reference=reference,
        params=params,
        base="unused",
        min_models=2,
        uses_data=True,
    )
    register_method(method)


_register(
    "pleas",
    PLEAS_DOC,
    "Nasery et al. 2025, PLeaS: Merging Models with Permutations and Least Squares, "
    "CVPR 2025, arXiv 2407.02447",
    {"budget": Param(1.0, "[1, 2]"), "ridge": Param(1e-4, "[0, inf)")},
)
_register(
    "permute",
    PERMUTE_DOC,
    "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries, "
    "ICLR 2023, arXiv 2209.04836",
    {},
)
