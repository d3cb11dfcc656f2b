"""Arcee Fusion: keep only the changes that matter most (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

import torch

from taskvec.errors import NumericError
from taskvec.methods.registry import merge_method

QUANTILE_SAMPLE = 1_000_000


def _quantiles(x: torch.Tensor, qs: list[float], generator: torch.Generator) -> list[float]:
    """Quantiles ⌊q·(n−1)⌋ of the sorted values, from at most 10⁶ entries sampled with
    replacement (exact for smaller tensors)."""
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered = flat.sort().values
    return [float(ordered[int(q * (ordered.numel() - 1))]) for q in qs]


@merge_method(
    "arcee_fusion",
    base="required",
    reference="Arcee AI, Arcee Fusion (mergekit's arcee_fusion)",
    random=True,
)
def arcee_fusion(
    tensors: torch.Tensor, base: torch.Tensor, *, generator: torch.Generator
) -> torch.Tensor:
    """importance = |θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀)) per row; keep the change where
    importance ≥ median + 1.5·IQR: θ = θ₀ + [importance ≥ thr] ⊙ (θ₁ − θ₀).

    Quantiles come from a seeded sample of at most 10⁶ entries, as in mergekit (whose sample is
    unseeded)."""
    if tensors.shape[0] != 1:
        raise NumericError(
            f"arcee_fusion takes the base and exactly one other model, got {tensors.shape[0]}"
        )
    other = tensors[0]
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    importance = (other - base).abs() * kl
    q1, median, q3 = _quantiles(importance, [0.25, 0.5, 0.75], generator)
    keep = importance >= median + 1.5 * (q3 - q1)
    return base + (other - base) * keep
