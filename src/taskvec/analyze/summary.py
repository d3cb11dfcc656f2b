"""From the streamed sums to the report's numbers: norms, cosines, angles, sign conflicts, mask
overlaps, per layer and per module type, and the PCA of the task vectors.

PCA (uncentred, so that the base stays at the origin): the task Gram matrix G = V Λ Vᵀ gives
the principal directions u_j = Σ_a V_aj τ_a / √λ_j of the span of the task vectors, and every
coordinate from inner products alone: ⟨τ_a, u_j⟩ = V_aj √λ_j for a task vector, and
⟨τ_m, u_j⟩ = Σ_a V_aj ⟨τ_m, τ_a⟩ / √λ_j for a merged model's τ_m, whose share of ‖τ_m‖² inside
the span, g_mᵀ G⁺ g_m / ‖τ_m‖², says how much the 2-D picture misses of it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from taskvec.analyze.inputs import Inputs
from taskvec.analyze.kinds import KINDS
from taskvec.analyze.stream import Totals


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    """G_ij / √(G_ii G_jj), 0 where a vector is zero."""
    d = gram.diagonal().clamp(min=0).sqrt()
    denom = d[:, None] * d[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp(min=1e-300), torch.zeros_like(gram))
    cos.diagonal().copy_((d > 0).to(cos.dtype))  # exactly 1 (not 1 − rounding) for τ ≠ 0
    return cos


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def _rate(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num.double() / den.clamp(min=1).double(), torch.nan)


def _matrix(m: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in m.tolist()]


def pca(gram: torch.Tensor, tasks: int) -> dict[str, Any]:
    """2-D coordinates of every vector in the task vectors' principal plane (module docstring)."""
    g = gram[:tasks, :tasks]
    lam, vecs = torch.linalg.eigh(g)
    lam, vecs = lam.flip(0).clamp(min=0), vecs.flip(1)
    vecs = vecs * torch.where(vecs.sum(0) < 0, -1.0, 1.0)  # a fixed sign: tasks mostly at +
    dims = min(2, tasks)
    keep = lam[:dims] > 1e-12 * max(float(lam[0]), 1e-300)
    coords = torch.zeros(gram.shape[0], 2, dtype=torch.float64)
    for j in range(dims):
        if keep[j]:
            coords[:, j] = gram[:, :tasks] @ vecs[:, j] / lam[j].sqrt()
    pinv = torch.linalg.pinv(g, hermitian=True)
    cross = gram[tasks:, :tasks]
    inside = (cross @ pinv * cross).sum(1)
    own = gram.diagonal()[tasks:]
    return {
        "coordinates": coords.tolist(),
        "explained": (lam / lam.sum().clamp(min=1e-300)).tolist(),
        "in_span": torch.where(own > 0, inside / own.clamp(min=1e-300), 0.0).tolist(),
    }


def summarize(inputs: Inputs, totals: Totals, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able result (``analysis.json``)."""
    labels, tasks = [*inputs.tasks, *inputs.merged], len(inputs.tasks)
    gram = totals.gram.sum(0)
    norms = gram.diagonal().clamp(min=0).sqrt()
    layer_sq = totals.gram.diagonal(dim1=1, dim2=2)  # (B, V)
    layers = inputs.layout.num_layers
    per_vector = {
        label: {
            "norm": float(norms[i]),
            "max_abs": float(totals.max_abs[:, i].max()),
            "near_zero_fraction": float(totals.near_zero[i]) / max(totals.numel, 1),
            "norm_by_kind": {
                k: math.sqrt(float(totals.kind_sq[j, i])) for j, k in enumerate(KINDS)
            },
            "norm_by_layer": layer_sq[:layers, i].clamp(min=0).sqrt().tolist(),
            "norm_outside_layers": math.sqrt(max(float(layer_sq[layers, i]), 0.0)),
            "max_abs_by_layer": totals.max_abs[:layers, i].tolist(),
        }
        for i, label in enumerate(labels)
    }
    cos = _cosine(gram)
    task_cos = cos[:tasks, :tasks]
    layer_cos = [_cosine(g)[:tasks, :tasks] for g in totals.gram[:layers]]
    conflict = _rate(totals.differ.sum(0), totals.both.sum(0))
    layer_conflict = _rate(totals.differ[:layers], totals.both[:layers])
    coords = pca(gram, tasks)
    return {
        "tasks": list(inputs.tasks),
        "merged": list(inputs.merged),
        "tensors": len(inputs.names),
        "parameters": totals.numel,
        "layers": layers,
        "left_out": inputs.left_out,
        "settings": settings,
        "per_vector": per_vector,
        "gram": _matrix(gram),
        "pairwise": {
            "cosine": _matrix(task_cos),
            "angle_degrees": _matrix(_angle(task_cos)),
            "sign_conflict": _matrix(conflict),
            "both_changed": totals.both.sum(0).tolist(),
            "top_k": {
                f"{m.fraction:g}": {
                    "jaccard": m.jaccard(),
                    "thresholds": m.thresholds,
                    "sizes": m.sizes,
                }
                for m in totals.masks
            },
        },
        "merged_cosine": _matrix(cos[tasks:, :tasks]),
        "per_layer": {
            "cosine": [_matrix(c) for c in layer_cos],
            "angle_degrees": [_matrix(_angle(c)) for c in layer_cos],
            "sign_conflict": [_matrix(c) for c in layer_conflict],
            "gram": [_matrix(g[:tasks, :tasks]) for g in totals.gram[:layers]],
        },
        "pca": {
            "explained": coords["explained"],
            "coordinates": dict(zip(labels, coords["coordinates"], strict=True)),
            "in_span": dict(zip(inputs.merged, coords["in_span"], strict=True)),
        },
    }
