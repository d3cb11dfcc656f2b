"""RAM and RAM+ (reinforced agent merging; mergekit's ram / ramplus_tl)."""

from __future__ import annotations

import torch

from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method

REFERENCE = "Reinforced Agent Merging (RAM), 2025; mergekit's ram and ramplus_tl"


def _masks(tensors: torch.Tensor, base: torch.Tensor, epsilon: float):
    tv = (tensors - base).reshape(tensors.shape[0], -1)
    active = tv.abs() > epsilon
    count = active.sum(0, keepdim=True)
    shared = active & (count > 1)
    unique = active & (count == 1)
    return tv * active, count, shared, unique


@merge_method(
    "ram",
    base="required",
    globals={"epsilon": Param(1e-5, "[0, inf)")},
    reference=REFERENCE,
    elementwise=True,
)
def ram(tensors: torch.Tensor, base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """Entries changed (|τ| > ε) by one model take its change; entries changed by several take
    the mean of their changes; others stay at θ₀."""
    tv, count, shared, unique = _masks(tensors, base, epsilon)
    merged = (tv * unique + tv * shared / count.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)


@merge_method(
    "ramplus_tl",
    base="required",
    globals={
        "r": Param(0.1, "[0, inf)"),
        "alpha": Param(0.2, "[0, inf)"),
        "epsilon": Param(1e-5, "(0, inf)"),
    },
    reference=REFERENCE,
)
def ramplus_tl(
    tensors: torch.Tensor, base: torch.Tensor, *, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """RAM with each model's unique entries scaled by 1 + r·clip(ρ, 0, α), ρ = shared/unique
    active counts of that model in this tensor."""
    tv, count, shared, unique = _masks(tensors, base, epsilon)
    rho = shared.sum(1) / unique.sum(1).clamp(min=epsilon)
    boost = (1 + r * rho.clamp(0, alpha)).unsqueeze(1)
    merged = (tv * unique * boost + tv * shared / count.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)
