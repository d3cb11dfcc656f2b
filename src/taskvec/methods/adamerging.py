"""``merge_method: adamerging`` as a pipeline method: coefficients learned on unlabelled data
(:mod:`taskvec.adamerging`, imported when a config uses it), for Hugging Face classification
experts whose heads stay per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.errors import TaskvecError
from taskvec.methods.params import Param
from taskvec.methods.pipeline import PipelineMethod, PipelinePlan
from taskvec.methods.registry import register_method

DOC = """θ(λ) = θ₀ + Σᵢ λᵢˡ τᵢˡ, λ minimising the prediction entropy on unlabelled inputs

λ per task and layer group (`granularity: layer`: each numbered layer, plus one group for the
tensors outside the layers) or per task (`task`), initialised at `init`, trained by Adam (`lr`)
for `steps` on Σₜ H(task t's head on the merged body, batch of task t's `data:`), kept in
[0, 1] with `clamp` (the authors' code). Heads (tensors the base lacks or whose shapes differ)
are not merged; the output is the merged body and the base's tensors. ∂L/∂λᵢˡ = ⟨∂L/∂θˡ, τᵢˡ⟩
with the task vectors streamed: memory ≈ 3 models + one tensor per task + activations."""


@dataclass
class AdaPlan:
    """A validated ``merge_method: adamerging`` config."""

    base: str
    experts: dict[str, str]
    data: dict[str, str]
    options: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"base: {self.base}",
            *(f"task {t}: {self.experts[t]} on {self.data[t]}" for t in self.experts),
            "settings: " + ", ".join(f"{k}={v}" for k, v in self.options.items()),
        ]


def _plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> PipelinePlan:
    from taskvec.data import open_data
    from taskvec.forward import head_of, model_config

    base, experts = ADAMERGING.inputs(cfg, config_dir)
    options = {k: p.default for k, p in ADAMERGING.params.items()}
    options |= ADAMERGING.checked(ADAMERGING.given(cfg.parameters), len(experts))
    plan = AdaPlan(base, experts, ADAMERGING.data(cfg, config_dir), options)
    for role, folder in (("base", base), *(("task", f) for f in experts.values())):
        try:
            config = model_config(folder)
        except TaskvecError as e:
            plan.problems.append(str(e))
            continue
        if role == "task" and head_of(config) != "classification":
            plan.problems.append(
                f"{folder}: adamerging needs a classification head (the entropy of its"
                " predictions); its config names none"
            )
    for task, source in plan.data.items():
        try:
            open_data(source).examples(1)
        except TaskvecError as e:
            plan.problems.append(f"task {task}: {e}")
    return plan


def _run(plan: Any, out: Path, **options: Any) -> Path:
    from taskvec.adamerging_hf import run_adamerging

    options.pop("device", None)  # computed on the CPU
    return run_adamerging(plan, out, **options)


ADAMERGING = PipelineMethod(
    "adamerging",
    DOC,
    _plan,
    _run,
    output="the merged body (heads stay per task), coefficients in adamerging.json",
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
        "seed": Param(0, "[0, inf)", integer=True),
    },
    uses_data=True,
)
register_method(ADAMERGING)
