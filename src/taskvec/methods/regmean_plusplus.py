"""``merge_method: regmean_plusplus`` as a pipeline method: RegMean block by block, each
block's inputs from the already merged model (:mod:`taskvec.regmean_plusplus`, imported when a
config uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.methods.params import Param
from taskvec.methods.pipeline import PipelineMethod, PipelinePlan, plan_with_data
from taskvec.methods.registry import register_method

DOC = """W⁽ˡ⁾ = (Σᵢ G̃ᵢ⁽ˡ⁾)⁻¹ Σᵢ G̃ᵢ⁽ˡ⁾ Wᵢ⁽ˡ⁾ᵀ, with Gᵢ⁽ˡ⁾ from block l's inputs in the merged model

RegMean's closed form per Linear weight (G̃ = αG + (1 − α) diag G; other tensors: the mean),
merged block by block: task i's data goes through the embeddings (the mean of the models')
and the blocks already merged; model i's own block l on those inputs gives the Gram matrices
Gᵢ of its Linear inputs (padding excluded, q/k/v counted once). Each model names its data with
`data:` (a datasets folder, a JSONL/CSV/text file with `path:column`, or `module:function`);
`examples` of each are used. Memory: every model, plus each task's hidden states."""


def _plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> PipelinePlan:
    return plan_with_data(REGMEAN_PLUSPLUS, cfg, config_dir)


def _run(plan: Any, out: Path, **options: Any) -> Path:
    from taskvec.algebra import load_model
    from taskvec.data import open_data
    from taskvec.regmean_plusplus import PlusPlusSettings, regmean_plusplus

    settings = PlusPlusSettings(**plan.options)
    texts = {
        t: [e.text for e in open_data(src).examples(settings.examples)]
        for t, src in plan.data.items()
    }
    experts = {t: Path(p) for t, p in plan.experts.items()}
    merged = regmean_plusplus(Path(plan.base), experts, texts, settings)
    options.pop("device", None)  # computed on the CPU
    return load_model(plan.base).patched(merged).save(out, **options)


REGMEAN_PLUSPLUS = PipelineMethod(
    "regmean_plusplus",
    DOC,
    _plan,
    _run,
    output="the merged model",
    reference="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of "
    "Regression Mean for Model Merging, arXiv 2508.03121",
    params={
        "alpha": Param(0.95, "[0, 1]"),
        "examples": Param(256, "[1, inf)", integer=True),
        "batch_size": Param(16, "[1, inf)", integer=True),
        "max_length": Param(128, "[1, inf)", integer=True),
    },
    uses_data=True,
)
register_method(REGMEAN_PLUSPLUS)
