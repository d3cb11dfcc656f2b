"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522)."""

from __future__ import annotations

import torch

from taskvec.methods.registry import merge_method


@merge_method(
    "model_stock",
    base="required",
    globals={"filter_wise": False},
    reference="Jang et al., Model Stock, ECCV 2024 (arXiv 2403.19522)",
    min_models=2,
)
def model_stock(tensors: torch.Tensor, base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """cos φ = mean pairwise cosine of τᵢ; t = N cos φ / (1 + (N − 1) cos φ);
    θ = t · mean(θᵢ) + (1 − t) · θ₀ (per row when filter_wise; t = 0 where 1 + (N−1)cos φ ≈ 0)."""
    n = tensors.shape[0]
    shape = base.shape
    if filter_wise:
        rows = base.reshape(1, -1) if base.dim() < 2 else base.reshape(shape[0], -1)
    else:
        rows = base.reshape(1, -1)
    deltas = tensors.reshape(n, *rows.shape) - rows
    norms = deltas.norm(dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (deltas[i] * deltas[j]).sum(-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    mean = tensors.reshape(n, *rows.shape).mean(0)
    return (t * mean + (1 - t) * rows).reshape(shape)
