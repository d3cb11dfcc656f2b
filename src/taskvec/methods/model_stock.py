"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522)."""

from __future__ import annotations

from typing import Any

import torch

from taskvec.methods.registry import WholeModelPass, merge_method


def _gram(deltas: torch.Tensor) -> torch.Tensor:
    """(rows, N, N) inner products of the task vectors ``deltas`` (N, rows, d), row by row."""
    return torch.einsum("ird,jrd->rij", deltas, deltas)


def _ratio(gram: torch.Tensor) -> torch.Tensor:
    """t = N cos φ / (1 + (N − 1) cos φ) per row of ``gram`` (rows, N, N), shaped (rows, 1);
    cos φ is the mean pairwise cosine, and t = 0 where 1 + (N − 1) cos φ ≈ 0."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    pairs = torch.triu_indices(n, n, offset=1, device=gram.device)
    dots = gram[:, pairs[0], pairs[1]]
    scale = (norms[:, pairs[0]] * norms[:, pairs[1]]).clamp(min=1e-6)
    cos = (dots / scale).clamp(-1, 1).mean(-1, keepdim=True)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))


def _block_gram(tensors: torch.Tensor, base: torch.Tensor, **_: Any) -> torch.Tensor:
    """The whole-tensor Gram matrix's share from one row block, (1, N, N) in float64 (the
    blocks' shares are summed)."""
    deltas = tensors.reshape(tensors.shape[0], 1, -1).sub_(base.reshape(1, 1, -1))  # own buffer
    return _gram(deltas).double()


def _whole_ratio(total: torch.Tensor, **_: Any) -> dict[str, Any]:
    return {"stock_ratio": _ratio(total).float()}


@merge_method(
    "model_stock",
    base="required",
    globals={"filter_wise": False},
    reference="Jang et al., Model Stock, ECCV 2024 (arXiv 2403.19522)",
    min_models=2,
    elementwise=True,
    tensor_pass=WholeModelPass(
        collect=_block_gram,
        finalize=_whole_ratio,
        wanted=lambda filter_wise=False, **_: not filter_wise,
    ),
)
def model_stock(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    filter_wise: bool,
    stock_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """cos φ = mean pairwise cosine of τᵢ; t = N cos φ / (1 + (N − 1) cos φ);
    θ = t · mean(θᵢ) + (1 − t) · θ₀ (per row when filter_wise; t = 0 where 1 + (N−1)cos φ ≈ 0).

    The cosines come from the Gram matrix of the task vectors (one matrix product per tensor,
    or per row when filter_wise). A large tensor is merged in row blocks: a first pass sums
    the blocks' Gram matrices (in float64) and gives each block the tensor's t."""
    n = tensors.shape[0]
    shape = base.shape
    per_row = filter_wise and base.dim() >= 2
    rows = base.reshape(shape[0], -1) if per_row else base.reshape(1, -1)
    deltas = tensors.reshape(n, *rows.shape).sub_(rows)  # the call's own buffer
    t = _ratio(_gram(deltas)) if stock_ratio is None else stock_ratio.to(deltas.device)
    total = deltas[0]  # Σ τᵢ accumulated in place (a contiguous add beats a strided mean)
    for delta in deltas[1:]:
        total.add_(delta)
    return total.mul_(t / n).add_(rows).reshape(shape)
