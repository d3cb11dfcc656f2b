"""``merge_method: emr`` as a pipeline method: it writes an EMR folder (:mod:`taskvec.emr`,
imported when a config uses it), not one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.methods.pipeline import PipelineMethod, PipelinePlan
from taskvec.methods.registry import register_method

DOC = """θₜ' = θ₀ + λₜ Mₜ ⊙ τ_uni: one unified task vector, a mask and a scale per task

Elect γ = sign(Σᵢ τᵢ) (0 counts as −) and τ_uni = γ ⊙ max over the i with sign τᵢ = γ of |τᵢ|;
masks Mᵢ = [τᵢ ⊙ γ > 0]; scales λᵢ = Σ|τᵢ| / Σ|Mᵢ ⊙ τ_uni| over the whole model. The output
is an EMR folder, not a model: the unified tensors, bit-packed masks and `emr.json` (task
names, after the models' folders, and scales); `taskvec emr-task FOLDER TASK BASE -o OUT`
materialises one task's model (`taskvec emr` writes the same folder from the command line)."""


def _plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> PipelinePlan:
    from taskvec.emr import plan_emr

    return plan_emr(cfg, config_dir, seed)


def _run(plan: Any, out: Path, **options: Any) -> Path:
    from taskvec.emr import run_emr

    return run_emr(plan, out, **options)


EMR = PipelineMethod(
    "emr",
    DOC,
    _plan,
    _run,
    output="an EMR folder (unified task vector, masks and scales)",
    reference="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging, "
    "NeurIPS 2024, arXiv 2405.17461",
    min_models=2,
)
register_method(EMR)
