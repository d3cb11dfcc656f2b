"""SCE: select, calculate, erase (Wan et al., FuseChat, arXiv 2408.07990)."""

from __future__ import annotations

import torch

from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method
from taskvec.methods.sparsify import topk_mask
from taskvec.methods.ties_family import sign_consensus


@merge_method(
    "sce",
    base="required",
    globals={"select_topk": Param(1.0, "(0, 1]"), "int8_mask": False},
    reference="Wan et al., FuseChat (SCE merging), 2024 (arXiv 2408.07990)",
)
def sce(
    tensors: torch.Tensor, base: torch.Tensor, *, select_topk: float, int8_mask: bool
) -> torch.Tensor:
    """Select: keep the ⌊select_topk · nnz(var)⌋ positions of highest variance across models;
    calculate ωᵢ ∝ mean(τᵢ²); erase minority signs (TIES);
    θ = θ₀ + Σ ωᵢmᵢτᵢ / Σ ωᵢmᵢ."""
    tv = tensors - base
    if select_topk < 1:
        var = tv.var(0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * select_topk) if select_topk > 0 else 0
        tv = tv * topk_mask(var, k).reshape(base.shape)
    energy = tv.square().reshape(tv.shape[0], -1).mean(1)
    total = float(energy.sum())
    omega = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / tv.shape[0])
    omega = omega.reshape(-1, *([1] * base.dim())) * sign_consensus(tv)
    return base + (tv * omega).sum(0) / omega.sum(0).clamp(min=1e-6)
