"""PCB-merging: parameter competition balancing (Du et al., NeurIPS 2024, arXiv 2410.02396)."""

from __future__ import annotations

import torch

from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method
from taskvec.methods.sparsify import topk_mask


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(1, keepdim=True).values
    hi = x.max(1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp(min=1e-12)


@merge_method(
    "pcb",
    base="required",
    globals={"lambda": Param(1.0), "pcb_ratio": Param(0.1, "(0, 1]")},
    reference="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024 "
    "(arXiv 2410.02396)",
)
def pcb(
    tensors: torch.Tensor, base: torch.Tensor, *, pcb_ratio: float, **params: float
) -> torch.Tensor:
    """β = exp(N·minmax(|τᵢ|)²) ⊙ tanh(τᵢ ⊙ Σⱼτⱼ); keep each task's top pcb_ratio of β,
    min-max normalised to β̂ᵢ; θ = θ₀ + λ Σ β̂ᵢτᵢ / Σ β̂ᵢ. Per tensor (the paper flattens the
    whole model; the released code's quantile clipping of |τ| is omitted)."""
    n = tensors.shape[0]
    tau = (tensors - base).reshape(n, -1)
    intra = torch.exp(n * _minmax(tau.abs()).square())
    inter = torch.tanh(tau * tau.sum(0, keepdim=True))
    beta = intra * inter
    k = max(1, int(pcb_ratio * beta.shape[1]))
    kept = torch.stack([topk_mask(b, k) for b in beta])
    floor = torch.where(kept, beta, torch.inf).min(1, keepdim=True).values
    beta = _minmax(torch.where(kept, beta, floor))
    merged = (beta * tau).sum(0) / beta.sum(0).clamp(min=1e-12)
    return base + params["lambda"] * merged.reshape(base.shape)
