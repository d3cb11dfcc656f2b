"""Human-readable reference of the registered methods, generated from the registry itself
(``taskvec methods --markdown`` writes ``docs/methods.md``; a test keeps the two in sync)."""

from __future__ import annotations

import inspect

from taskvec.methods.pipeline import PipelineMethod
from taskvec.methods.registry import REQUIRED, MergeMethod, all_methods

_BASE = {
    "required": "required",
    "optional": "optional",
    "unused": "no base role (a `base_model` not listed under `models` is one more input, as in "
    "mergekit)",
}


# Where taskvec's defaults stand relative to mergekit 0.1.5 and to each method's paper.
VERSUS: dict[str, tuple[str, str]] = {
    "linear": ("same", "same (uniform soup = equal weights)"),
    "task_arithmetic": ("same", "the paper picks λ on validation data; default λ = 1"),
    "ties": (
        "same (weights before the sign vote, per-tensor trim, normalize true)",
        "`elect: unweighted`, `trim_scope: model`; the paper uses density 0.2, λ in [0.8, 2.5]",
    ),
    "dare_linear": ("same (L1 rescale)", "1/p rescale: `rescale: expectation`"),
    "dare_ties": ("same (L1 rescale)", "1/p rescale: `rescale: expectation`"),
    "breadcrumbs": (
        "same as 0.1.5; γ = 0 keeps the top-k where 0.1.4 zeroed everything",
        "(β, γ) of the paper = (`gamma`, 1 − β − γ as `density`)",
    ),
    "breadcrumbs_ties": ("same", "the paper has no sign consensus: use `breadcrumbs`"),
    "della": ("same (L1 rescale)", "1/pᵢ rescale: `rescale: expectation`"),
    "della_linear": ("same (L1 rescale)", "1/pᵢ rescale: `rescale: expectation`"),
    "arcee_fusion": ("same formula; the quantile sample is seeded", "no paper"),
    "model_stock": ("same", "same (per tensor; `filter_wise` per row)"),
    "sce": ("same", "same"),
    "ram": ("same", "same"),
    "ramplus_tl": ("same", "same"),
    "slerp": ("same", "Shoemake's formula; linear when nearly colinear"),
    "nuslerp": ("same", "mergekit's method"),
    "multislerp": ("same, but all-zero inputs give zero where mergekit raises", "mergekit's"),
    "karcher": ("same", "same fixed-point iteration; 10 steps by default"),
    "nearswap": ("same", "mergekit's method"),
    "passthrough": ("same", "layer stacking via `slices`"),
    "consensus": ("not in mergekit", "k = 2 as in the paper; λₜ = 0.6 (tuned there per task)"),
    "magmax": ("not in mergekit", "same (max-magnitude per entry)"),
    "pcb": ("not in mergekit", "same; the paper tunes ratio and λ on validation"),
    "gram_schmidt": ("not in mergekit", "seed 000 §9.2: whole-model Gram-Schmidt, then sum"),
    "tsv": ("not in mergekit", "α = 1 (the paper picks α on validation)"),
    "iso_c": ("not in mergekit", "α = 1 (the paper picks α on validation)"),
    "iso_cts": ("not in mergekit", "α = 1, common space fraction 0.8 as in the paper"),
    "fda": (
        "not in mergekit",
        "the authors' layer-wise algorithm; 64 anchors and 200 steps by default (the paper "
        "uses 1200 steps) to fit a 2-core CPU, see docs/fda.md",
    ),
    "emr": ("not in mergekit", "same (per-task masks and scales; one model per task)"),
    "pleas": (
        "not in mergekit",
        "MLP stacks (ReLU) only; the budget is a per-layer width factor, not the paper's "
        "parameter count; more than two models merged in sequence (budget 1 only); "
        "see docs/pleas.md",
    ),
    "permute": (
        "not in mergekit",
        "Git Re-Basin's activation matching (one pass, correlation), MLP stacks only",
    ),
    "wudi": (
        "not in mergekit",
        "Adam, lr 1e-5, 300 steps as the reference code; by default (`step_tol` 0.1) the "
        "steps between exact products use a model of the Gram matrix (rank ≤ 32) and each "
        "differs from the exact step from the same state by ≤ 0.1·lr (RMS): τ_m within 1–3% of "
        "the reference's on real task vectors; `step_tol: 0` is the reference exactly",
    ),
    "regmean": (
        "not in mergekit",
        "α = 0.95 as FusionBench (the paper: 0.9); a linear solve where the code inverts",
    ),
    "adamerging": (
        "not in mergekit",
        "entropy loss, init 0.3, Adam lr 1e-3 as the paper; λ clamped to [0, 1] as the authors' "
        "code (FusionBench: off); the gradient ⟨∂L/∂θ, τ⟩ streamed instead of T task vectors "
        "in memory; layer groups from the numbered layers plus one for the rest",
    ),
    "regmean_plusplus": (
        "not in mergekit",
        "block-sequential as FusionBench's regmean_plusplus; tensors outside the blocks are "
        "averaged; α = 0.95",
    ),
    "fisher": (
        "not in mergekit",
        "the paper's formula; its code also divides λᵢ by ‖Fᵢ‖ (`normalize: true`, as "
        "FusionBench) and floors the first model's Fisher only (`favor_target_model: true`)",
    ),
}


def _base(m: MergeMethod | PipelineMethod) -> str:
    """A pipeline method without a base refuses one (it does not merge it as an input)."""
    if isinstance(m, PipelineMethod) and m.base == "unused":
        return "none (a `base_model` is refused)"
    return _BASE[m.base]


def _param(m: MergeMethod | PipelineMethod, key: str) -> str:
    """``name`` (per model, default, valid values); a plain switch's values go unsaid."""
    p = m.params[key]
    unset = "unset" if p.default is None else repr(p.default)
    default = "required" if p.default is REQUIRED else unset
    text = f"per model, {default}" if key in m.per_model else default
    if p.kind != "switch" or p.choices:
        text += f"; {p.describe()}"
    return f"`{key}` ({text})"


def _params(m: MergeMethod | PipelineMethod) -> str:
    return ", ".join(_param(m, k) for k in [*m.per_model, *m.globals]) or "none"


def _notes(m: MergeMethod | PipelineMethod) -> list[str]:
    """How the method runs, besides its formula and parameters."""
    if isinstance(m, PipelineMethod):
        return [
            f"- whole-model pipeline: writes {m.output}; `--dry-run` checks the config and the "
            "models' headers; not resumable"
        ]
    notes = []
    if m.random:
        notes.append("- random: seeded per tensor from `--random-seed` and the tensor name")
    if m.whole_model is not None:
        notes.append("- needs a streamed whole-model first pass (when its options ask for it)")
    if m.elementwise:
        notes.append("- elementwise: large tensors are processed in row blocks")
    if m.statistics is not None:
        notes.append(
            f"- needs {m.statistics} statistics of every model (`statistics:` next to it under "
            f"`models`, a `taskvec stats --kind {m.statistics}` folder)"
        )
    return notes


def method_table() -> str:
    """One line per method: name and formula."""
    methods = all_methods()
    width = max(map(len, methods))
    return "\n".join(f"{name:<{width}}  {m.formula}" for name, m in methods.items())


def method_reference() -> str:
    """Every method with its formula, parameters, defaults, base use, notes and reference."""
    out = [
        "# Merge methods",
        "",
        "Generated by `taskvec methods --markdown` from the method registry; do not edit.",
        "Notation: θ₀ base, θᵢ inputs, τᵢ = θᵢ − θ₀, wᵢ per-model weight, λ global scale.",
        "An input given as a saved task vector τ (`taskvec diff`) is the model θ₀ + τ; it needs",
        "the `base_model` it was extracted from.",
        "All methods compute in float32 (float64 if an input is float64); `dtype`/`out_dtype`",
        "only choose the output dtype.",
        "Parameter ranges are checked before any tensor is read; N is the number of models",
        "merged (besides the base); NaN and infinities are never valid.",
        "Whole-model pipeline methods (marked below) are not per-tensor functions: they take",
        "one value per parameter, at the top level, and no `dtype`/`out_dtype`.",
        "",
    ]
    for name, m in all_methods().items():
        doc = inspect.cleandoc(m.doc if isinstance(m, PipelineMethod) else m.fn.__doc__ or "")
        out += [
            f"## `{name}`",
            "",
            doc,
            "",
            f"- parameters: {_params(m)}",
            f"- base model: {_base(m)}; at least {m.min_models} other model(s)",
        ]
        out += _notes(m)
        if name in VERSUS:
            vs_mergekit, vs_paper = VERSUS[name]
            out.append(f"- versus mergekit 0.1.5: {vs_mergekit}; versus the paper: {vs_paper}")
        out += [f"- reference: {m.reference}", ""]
    return "\n".join(out)
