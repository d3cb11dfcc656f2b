"""``merge_method: adamerging`` as a pipeline method: coefficients learned on unlabelled data
(:mod:`taskvec.adamerging`, imported when a config uses it), for Hugging Face classification
experts whose heads stay per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.methods.params import Param
from taskvec.methods.pipeline import PipelineMethod, PipelinePlan, plan_with_data
from taskvec.methods.registry import register_method

DOC = """θ(λ) = θ₀ + Σᵢ λᵢˡ τᵢˡ, λ minimising the prediction entropy on unlabelled inputs

λ per task and layer group (`granularity: layer`: each numbered layer, plus one group for the
tensors outside the layers) or per task (`task`), initialised at `init`, trained by Adam (`lr`)
for `steps` on Σₜ H(task t's head on the merged body, batch of task t's `data:`), kept in
[0, 1] with `clamp` (the authors' code). Heads (tensors the base lacks or whose shapes differ)
are not merged: the output is the merged body with the base's tensors, and each task's head in
`heads/<task>.safetensors`. ∂L/∂λᵢˡ = ⟨∂L/∂θˡ, τᵢˡ⟩ with the task vectors streamed twice a
step, never held: memory ≈ 3 float32 models (θ₀, θ(λ), ∂L/∂θ) + T × the largest tensor + the
activations of the step's T batches (MiniLM, 6 tasks: see docs/benchmark.md). `precision:
bfloat16` runs the forward and backward passes under bfloat16 autocast (θ, λ and ⟨∂L/∂θ, τ⟩
stay float32/64): 1.6× faster per step on a CPU with AVX-512 BF16, the same learned merge on
the benchmark."""


def _no_head(folder: str, config: dict[str, Any]) -> str | None:
    from taskvec.forward import head_of

    if head_of(config) == "classification":
        return None
    return (
        f"{folder}: adamerging needs a classification head (the entropy of its predictions); "
        "its config names none"
    )


def _plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> PipelinePlan:
    return plan_with_data(ADAMERGING, cfg, config_dir, _no_head)


def _run(plan: Any, out: Path, **options: Any) -> Path:
    from taskvec.adamerging_hf import run_adamerging

    options.pop("device", None)  # computed on the CPU
    return run_adamerging(plan, out, **options)


ADAMERGING = PipelineMethod(
    "adamerging",
    DOC,
    _plan,
    _run,
    output="the merged body, each task's head in heads/, coefficients in adamerging.json",
    reference="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning, "
    "ICLR 2024, arXiv 2310.02575",
    params={
        "granularity": Param("layer", choices=("layer", "task")),
        "steps": Param(500, "[0, inf)", integer=True),
        "lr": Param(1e-3, "(0, inf)"),
        "init": Param(0.3, "(-inf, inf)"),
        "batch_size": Param(16, "[1, inf)", integer=True),
        "max_length": Param(128, "[1, inf)", integer=True),
        "clamp": Param(True),
        "precision": Param("float32", choices=("float32", "bfloat16")),
        "seed": Param(0, "[0, inf)", integer=True),
    },
    uses_data=True,
)
register_method(ADAMERGING)
