"""Gram-Schmidt orthogonalisation of task vectors before task arithmetic.

The task vectors are orthogonalised in the order listed, over the whole model:
τ'₁ = τ₁, τ'ₖ = τₖ − Σ_{j<k} ⟨τₖ, τ'ⱼ⟩/‖τ'ⱼ‖² τ'ⱼ, then θ = θ₀ + λ Σ wₖ τ'ₖ. Each τ'ₖ is a fixed
linear combination Σⱼ Aⱼₖ τⱼ, and A depends only on the Gram matrix Gᵢⱼ = ⟨τᵢ, τⱼ⟩, so a
streamed first pass accumulates G (N×N, float64) and the second pass applies A tensor by
tensor. Ref.: the orthogonalisation step of the seed document's §9.2 (task decoupling).
"""

from __future__ import annotations

from typing import Any

import torch

from taskvec.methods.linear import weighted_sum
from taskvec.methods.params import REQUIRED, Param
from taskvec.methods.registry import WholeModelPass, merge_method


def gram_matrix(tensors: torch.Tensor, base: torch.Tensor, **_: Any) -> torch.Tensor:
    """Gᵢⱼ = ⟨τᵢ, τⱼ⟩ over this tensor (summed over the model by the engine)."""
    flat = (tensors - base).reshape(tensors.shape[0], -1).double()
    return flat @ flat.T


def orthogonalising_coefficients(gram: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """A with τ' = τ A: classical Gram-Schmidt carried out on coefficient vectors, using G for
    inner products. A vector (nearly) in the span of the earlier ones becomes (nearly) zero."""
    n = gram.shape[0]
    coef = torch.eye(n, dtype=torch.float64)
    scale = float(gram.diagonal().max()) if n else 0.0
    for k in range(n):
        for j in range(k):
            aj = coef[:, j]
            norm_sq = float(aj @ gram @ aj)
            if norm_sq > eps * max(scale, 1e-300):
                coef[:, k] -= float(coef[:, k] @ gram @ aj) / norm_sq * aj
    return coef


def _finalize(total: torch.Tensor, **_: Any) -> dict[str, Any]:
    return {"coefficients": orthogonalising_coefficients(total)}


@merge_method(
    "gram_schmidt",
    base="required",
    per_model={"weight": Param(REQUIRED)},
    globals={"lambda": Param(1.0)},
    reference="Gram-Schmidt task decoupling (seed 000, §9.2); cf. Ilharco et al. 2023",
    whole_model=WholeModelPass(collect=gram_matrix, finalize=_finalize),
    elementwise=True,
)
def gram_schmidt(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    weight: torch.Tensor,
    coefficients: torch.Tensor,
    **params: float,
) -> torch.Tensor:
    """θ = θ₀ + λ Σₖ wₖ τ'ₖ with τ'ₖ the whole-model Gram-Schmidt orthogonalised τₖ."""
    mix = coefficients.to(weight) @ weight.double()  # Σₖ wₖ Aⱼₖ per input j
    delta = weighted_sum(tensors.sub_(base), mix.to(tensors.dtype), in_place=True)
    return delta.mul_(params["lambda"]).add_(base)
