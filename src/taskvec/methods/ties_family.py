"""Sparsify-and-combine task-vector merges: TIES, DARE, Breadcrumbs, DELLA and their linear forms.

Each method follows mergekit's generalized task arithmetic, so a mergekit YAML gives the same
result. With deltas δᵢ = wᵢ · sparsify(θᵢ − θ₀):

* without sign consensus: θ = θ₀ + λ Σᵢ δᵢ  (÷ Σᵢ wᵢ if normalize);
* with sign consensus (TIES election, Yadav et al. 2023): s = sign(Σᵢ δᵢ) (0 counts as +),
  mᵢ = [sign δᵢ = s], θ = θ₀ + λ Σᵢ mᵢδᵢ  (÷ Σᵢ mᵢwᵢ if normalize).

Like mergekit, the weights are applied before the election and TIES trims each tensor on its
own. The paper's variants are one option away: ``elect: unweighted`` elects the sign from the
unweighted trimmed vectors, and ``trim_scope: model`` keeps the top-``density`` magnitudes of
each task vector over the whole model (a streamed first pass builds a 2¹⁶-bin histogram of
every τᵢ's magnitudes; the threshold is exact to bfloat16 resolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from taskvec.errors import ConfigError
from taskvec.methods import sparsify as sp
from taskvec.methods.params import REQUIRED, Param
from taskvec.methods.registry import WholeModelPass, merge_method


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """mᵢ = [sign δᵢ = sign Σⱼ δⱼ], with the elected sign + where the sum is 0."""
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


BLOCK = 1 << 15  # entries per block: a block of every input stays in the core's cache


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    unweighted_election: bool = False,
    windows: list[sp.Window] | None = None,
) -> torch.Tensor:
    """θ₀ + λ · (Σ masked weighted deltas) / (normalizer), as in the module docstring.

    ``deltas`` and ``base`` are overwritten (the result is ``base``). ``windows`` (one per
    model) first zeroes the entries outside each model's magnitude-rank window. With
    consensus, the entries agreeing with the elected sign are summed as Σ max(δᵢ, 0) where the
    sign is + and Σ min(δᵢ, 0) where it is −, which equals Σ mᵢδᵢ without materialising the
    masks. The work runs in cache-sized blocks.
    """
    w = weight.to(deltas.dtype)
    flat = deltas.reshape(deltas.shape[0], -1)
    out = base.reshape(-1)  # the call's own buffer: the result is built in place
    keep = None
    if windows is not None:
        for row, window in zip(flat, windows, strict=True):
            row[window.drop] = 0  # ties outside the window; now below lo (or zero anyway)
        keep = _Keep(windows, deltas)
    total = float(w.sum())
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    alphas = [scale * wi / divisor for wi in w.tolist()]
    unit = bool((w == 1).all())
    for start in range(0, out.numel(), BLOCK):
        block = flat[:, start : start + BLOCK]
        if keep is not None:
            keep(block)
        target = out[start : start + BLOCK]
        if consensus:
            mixed = _consensus_block(block, w, unit, normalize, unweighted_election)
            target.add_(mixed, alpha=scale)
        else:
            for delta, alpha in zip(block, alphas, strict=True):
                target.add_(delta, alpha=alpha)
    return out.reshape(base.shape)


class _Keep:
    """Zeroes, in place, the entries of a block outside each model's ``[lo, hi]`` magnitudes
    (testing only the bounds some model actually has)."""

    def __init__(self, windows: list[sp.Window], like: torch.Tensor):
        self.lo = like.new_tensor([w.lo for w in windows]).unsqueeze(1)
        self.hi = like.new_tensor([w.hi for w in windows]).unsqueeze(1)
        self.test_lo = any(w.lo > 0 for w in windows)
        self.test_hi = any(w.hi < math.inf for w in windows)

    def __call__(self, block: torch.Tensor) -> None:
        if not (self.test_lo or self.test_hi):
            return
        a = block.abs()
        if self.test_lo and self.test_hi:
            block.mul_((a >= self.lo) & (a <= self.hi))
        elif self.test_lo:
            block.mul_(a >= self.lo)
        else:
            block.mul_(a <= self.hi)


def _consensus_block(
    deltas: torch.Tensor, w: torch.Tensor, unit: bool, normalize: bool, unweighted_election: bool
) -> torch.Tensor:
    weighted = deltas if unit else deltas * w.unsqueeze(1)
    pos = weighted.clamp(min=0).sum(0)
    neg = weighted.clamp(max=0).sum(0)
    elected = ((deltas.sum(0) if unweighted_election else pos + neg) >= 0).to(pos.dtype)
    mixed = torch.lerp(neg, pos, elected)  # exactly pos where elected is 1, neg where 0
    if normalize:
        row = w.unsqueeze(0)
        wpos = (row @ (weighted > 0).to(w.dtype)).squeeze(0)
        wneg = (row @ (weighted < 0).to(w.dtype)).squeeze(0)
        divisor = torch.lerp(wneg, wpos, elected)
        mixed /= divisor.add_(divisor == 0)  # no agreeing entry: the sum is 0 anyway
    return mixed


_COMMON: dict[str, Param | bool] = {"lambda": Param(1.0), "int8_mask": False}


def _register(
    name: str,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    extra: dict[str, Param],
    random: bool,
    reference: str,
    sparsify: Callable[..., torch.Tensor],
    formula: str,
    options: dict[str, Param] | None = None,
    whole_model: WholeModelPass | None = None,
    window_of: Callable[..., sp.Window] | None = None,
) -> None:
    def method(
        tensors: torch.Tensor,
        base: torch.Tensor,
        *,
        weight: torch.Tensor,
        density: torch.Tensor,
        normalize: bool,
        rescale: bool | str,
        generator: torch.Generator | None = None,
        **params: Any,
    ) -> torch.Tensor:
        mode = sp.rescale_mode(rescale)
        per = {k: params.pop(k) for k in extra}
        thresholds = params.pop("thresholds", None)
        params.pop("trim_scope", None)
        elect = params.pop("elect", "weighted")
        if elect not in ("weighted", "unweighted"):
            raise ConfigError(f"elect must be 'weighted' or 'unweighted', got {elect!r}")

        def one(delta: torch.Tensor, i: int) -> torch.Tensor:
            if thresholds is not None:
                return sp.threshold(delta, float(thresholds[i]), float(density[i]), mode)
            kwargs = {k: float(v[i]) for k, v in per.items()}
            if random:
                kwargs["generator"] = generator
            return sparsify(delta, float(density[i]), rescale=mode, **kwargs)

        deltas = tensors.sub_(base)  # tensors is the call's own buffer
        windows = None
        if window_of is not None and mode is None:  # deterministic masks, applied blockwise
            if thresholds is not None:
                none = torch.zeros(0, dtype=torch.long)
                windows = [sp.Window(float(t), math.inf, none) for t in thresholds]
            else:
                windows = [
                    window_of(
                        deltas[i], float(density[i]), **{k: float(v[i]) for k, v in per.items()}
                    )
                    for i in range(deltas.shape[0])
                ]
        else:
            for i in range(deltas.shape[0]):
                deltas[i] = one(deltas[i], i)
        return combine(
            base,
            deltas,
            weight,
            consensus=consensus,
            normalize=normalize,
            scale=params["lambda"],
            unweighted_election=elect == "unweighted",
            windows=windows,
        )

    method.__doc__ = formula
    method.__name__ = name
    merge_method(
        name,
        base="required",
        per_model={"weight": Param(REQUIRED), "density": Param(1.0, "(0, 1]"), **extra},
        globals={
            **_COMMON,
            "normalize": normalize,
            "rescale": Param(rescale, choices=sp.RESCALE_MODES),
            **(options or {}),
        },
        reference=reference,
        random=random,
        whole_model=whole_model,
    )(method)


def _scope(trim_scope: str = "tensor", **_: Any) -> bool:
    if trim_scope not in ("tensor", "model"):
        raise ConfigError(f"trim_scope must be 'tensor' or 'model', got {trim_scope!r}")
    return trim_scope == "model"


def _magnitude_histograms(tensors: torch.Tensor, base: torch.Tensor, **_: Any) -> torch.Tensor:
    """Per model, a histogram of |τᵢ| over 16-bit keys (summed over tensors)."""
    return torch.stack([sp.magnitude_histogram((t - base).abs()) for t in tensors])


def _global_thresholds(total: torch.Tensor, density: torch.Tensor, **_: Any) -> dict[str, Any]:
    return {
        "thresholds": [
            sp.histogram_threshold(h, float(d)) for h, d in zip(total, density, strict=True)
        ]
    }


GLOBAL_TRIM = WholeModelPass(
    collect=_magnitude_histograms, finalize=_global_thresholds, wanted=_scope
)


TIES = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)"
DARE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)"
CRUMBS = "Davari & Belilovsky, Model Breadcrumbs, 2023 (arXiv 2312.06795)"
DELLA = "Deep et al., DELLA-Merging, 2024 (arXiv 2406.11617)"

_register(
    "ties",
    consensus=True,
    normalize=True,
    rescale=False,
    extra={},
    random=False,
    reference=TIES,
    sparsify=sp.magnitude,
    formula="""θ = θ₀ + λ Σ mᵢ wᵢ top_k(τᵢ) / Σ mᵢ wᵢ, mᵢ = sign agreement with Σ wᵢ top_k(τᵢ).

    top_k keeps the ⌊density·n⌋ largest |τᵢ| of each tensor. As in mergekit, weights are applied
    before the sign election and trimming is per tensor; the paper's variant is
    `elect: unweighted` with `trim_scope: model` (top-k over the whole model, from a streamed
    histogram pass). The paper's defaults are density 0.2 and λ tuned in [0.8, 2.5].""",
    options={
        "trim_scope": Param("tensor", choices=("tensor", "model")),
        "elect": Param("weighted", choices=("weighted", "unweighted")),
    },
    whole_model=GLOBAL_TRIM,
    window_of=sp.magnitude_window,
)
_register(
    "dare_linear",
    consensus=False,
    normalize=False,
    rescale=True,
    extra={},
    random=True,
    reference=DARE,
    sparsify=sp.random_drop,
    formula="""θ = θ₀ + λ Σ wᵢ rescale(Bernoulli(density) ⊙ τᵢ).

    `rescale: true` (the default, as in mergekit) scales survivors so the L1 norm of τᵢ is
    preserved; the paper divides by the keep probability: `rescale: expectation`.""",
)
_register(
    "dare_ties",
    consensus=True,
    normalize=False,
    rescale=True,
    extra={},
    random=True,
    reference=DARE,
    sparsify=sp.random_drop,
    formula="""DARE drop-and-rescale of each τᵢ, then TIES sign consensus (unnormalized).

    Rescaling as in `dare_linear` (`rescale: expectation` for the paper's 1/p).""",
)
_register(
    "breadcrumbs",
    consensus=False,
    normalize=False,
    rescale=False,
    extra={"gamma": Param(0.01, "[0, 1)")},
    random=False,
    reference=CRUMBS,
    sparsify=sp.outliers,
    window_of=sp.outlier_window,
    formula="""θ = θ₀ + λ Σ wᵢ (τᵢ without its top-γ outliers and its smallest entries).

    Keeps ⌊density·n⌋ entries per tensor after dropping the ⌊γn⌋ largest (fewer if density
    requires). The paper's (β outliers, γ small) map to `gamma: β`, `density: 1 − β − γ`.
    γ = 0 keeps the plain top-k (mergekit 0.1.4 zeroed the whole vector there).""",
)
_register(
    "breadcrumbs_ties",
    consensus=True,
    normalize=False,
    rescale=False,
    extra={"gamma": Param(0.01, "[0, 1)")},
    random=False,
    reference=CRUMBS,
    sparsify=sp.outliers,
    window_of=sp.outlier_window,
    formula="Breadcrumbs masking of each τᵢ, then TIES sign consensus (unnormalized).",
)
_register(
    "della",
    consensus=True,
    normalize=True,
    rescale=True,
    extra={"epsilon": Param(0.15, "[0, 0.5)")},
    random=True,
    reference=DELLA,
    sparsify=sp.della_magprune,
    formula="""DELLA MagPrune of each τᵢ, then TIES sign consensus and normalization.

    MagPrune keeps an entry with probability rising linearly with its magnitude rank in its row,
    from density − ε to density + ε (equal magnitudes ranked by position, as a stable sort).
    `rescale: true` (default, as in mergekit) preserves the L1 norm; the paper's 1/pᵢ is
    `rescale: expectation`.""",
)
_register(
    "della_linear",
    consensus=False,
    normalize=False,
    rescale=True,
    extra={"epsilon": Param(0.15, "[0, 0.5)")},
    random=True,
    reference=DELLA,
    sparsify=sp.della_magprune,
    formula="θ = θ₀ + λ Σ wᵢ MagPrune(τᵢ)  (MagPrune and rescaling as in `della`).",
)
