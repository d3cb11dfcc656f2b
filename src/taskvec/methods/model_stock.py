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
    θ = t · mean(θᵢ) + (1 − t) · θ₀ (per row when filter_wise; t = 0 where 1 + (N−1)cos φ ≈ 0).

    The cosines come from the Gram matrix of the task vectors (one matrix product per tensor,
    or per row when filter_wise)."""
    n = tensors.shape[0]
    shape = base.shape
    per_row = filter_wise and base.dim() >= 2
    rows = base.reshape(shape[0], -1) if per_row else base.reshape(1, -1)
    deltas = tensors.reshape(n, *rows.shape).sub_(rows)  # the call's own buffer
    gram = torch.einsum("ird,jrd->rij", deltas, deltas)  # (rows, N, N) inner products
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    pairs = torch.triu_indices(n, n, offset=1, device=gram.device)
    dots = gram[:, pairs[0], pairs[1]]
    scale = (norms[:, pairs[0]] * norms[:, pairs[1]]).clamp(min=1e-6)
    cos = (dots / scale).clamp(-1, 1).mean(-1, keepdim=True)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    total = deltas[0]  # Σ τᵢ accumulated in place (a contiguous add beats a strided mean)
    for delta in deltas[1:]:
        total.add_(delta)
    return total.mul_(t / n).add_(rows).reshape(shape)
