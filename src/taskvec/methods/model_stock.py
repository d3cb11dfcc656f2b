"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522)."""

from __future__ import annotations

from typing import Any

import torch

from taskvec import blas
from taskvec.methods.registry import TensorPass, merge_method


def _gram(deltas: torch.Tensor) -> torch.Tensor:
    """(rows, N, N) inner products of the task vectors ``deltas`` (N, rows, d), row by row."""
    return torch.einsum("ird,jrd->rij", deltas, deltas)


def _tensor_gram(deltas: torch.Tensor) -> torch.Tensor:
    """(1, N, N) inner products of the whole task vectors ``deltas`` (N, ...)."""
    return blas.gram(deltas.reshape(deltas.shape[0], -1)).unsqueeze(0)


def _ratio(gram: torch.Tensor) -> torch.Tensor:
    """t = N cos φ / (1 + (N − 1) cos φ) per row of ``gram`` (rows, N, N), shaped (rows, 1);
    cos φ is the mean pairwise cosine (each τᵢ·τⱼ / max(‖τᵢ‖‖τⱼ‖, 1e-6), as in mergekit), and
    t = 0 where 1 + (N − 1) cos φ ≈ 0."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    pairs = torch.triu_indices(n, n, offset=1, device=gram.device)
    dots = gram[:, pairs[0], pairs[1]]
    scale = (norms[:, pairs[0]] * norms[:, pairs[1]]).clamp(min=1e-6)
    cos = (dots / scale).clamp(-1, 1).mean(-1, keepdim=True)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))


def _deltas(tensors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """τᵢ = θᵢ − θ₀ in the buffer of ``tensors`` (N, *rows.shape)."""
    return tensors.reshape(tensors.shape[0], *rows.shape).sub_(rows)


def _sum(deltas: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ τᵢ (N ≥ 2) into ``out``, which may be ``deltas[0]`` (contiguous adds beat a strided
    sum)."""
    torch.add(deltas[0], deltas[1], out=out)
    for delta in deltas[2:]:
        out.add_(delta)
    return out


def _collect(
    tensors: torch.Tensor, base: torch.Tensor, partial: torch.Tensor, **_: Any
) -> torch.Tensor:
    """A row block's Σ τᵢ into ``partial`` and its share of the tensor's Gram matrix, (1, N, N)
    in float64 (the blocks' shares are summed)."""
    deltas = _deltas(tensors, base.reshape(1, -1).to(tensors.dtype))
    _sum(deltas, partial.view(1, -1))
    return _tensor_gram(deltas).double()


def _finish(
    partial: torch.Tensor, base: torch.Tensor, total: torch.Tensor, **_: Any
) -> torch.Tensor:
    """θ₀ + (t / N) · Σ τᵢ for a row block, t from the whole tensor's Gram matrix."""
    t = float(_ratio(total))
    return torch.add(base, partial, alpha=t / total.shape[-1], out=partial)


@merge_method(
    "model_stock",
    base="required",
    globals={"filter_wise": False},
    reference="Jang et al., Model Stock, ECCV 2024 (arXiv 2403.19522)",
    min_models=2,
    elementwise=True,
    tensor_pass=TensorPass(
        collect=_collect,
        finish=_finish,
        wanted=lambda filter_wise=False, **_: not filter_wise,
    ),
)
def model_stock(tensors: torch.Tensor, base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """cos φ = mean pairwise cosine of τᵢ; t = N cos φ / (1 + (N − 1) cos φ);
    θ = t · mean(θᵢ) + (1 − t) · θ₀ (per row when filter_wise; t = 0 where 1 + (N−1)cos φ ≈ 0).

    The cosines come from the Gram matrix of the task vectors (dot products per tensor, a
    matrix product per row when filter_wise) and divide by max(‖τᵢ‖‖τⱼ‖, 1e-6), as mergekit
    does: nearly zero task vectors get a smaller t. A large tensor is merged in two phases over
    row blocks (its Gram matrix summed in float64, then θ₀ + (t / N) Σ τᵢ per block), reading
    each input once."""
    n = tensors.shape[0]
    shape = base.shape
    per_row = filter_wise and base.dim() >= 2
    rows = base.reshape(shape[0], -1) if per_row else base.reshape(1, -1)
    deltas = _deltas(tensors, rows)
    t = _ratio(_gram(deltas) if per_row else _tensor_gram(deltas))
    return _sum(deltas, deltas[0]).mul_(t / n).add_(rows).reshape(shape)
