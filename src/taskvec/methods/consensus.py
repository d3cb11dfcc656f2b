"""Consensus merging with TALL masks (Wang, Dimitriadis et al., ICML 2024, arXiv 2405.07813)."""

from __future__ import annotations

import torch

from taskvec.methods.linear import weighted_sum
from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method


def tall_masks(tau: torch.Tensor, tau_mtl: torch.Tensor, tall_lambda: torch.Tensor) -> torch.Tensor:
    """mₜ = [|τₜ| > λₜ |τ_MTL − τₜ|]: the entries task t relies on."""
    lam = tall_lambda.reshape(-1, *([1] * (tau.dim() - 1))).to(tau.dtype)
    return tau.abs() > lam * (tau_mtl - tau).abs()


@merge_method(
    "consensus",
    base="required",
    per_model={"weight": Param(1.0), "tall_lambda": Param(0.6, "[0, inf)")},
    globals={"lambda": Param(1.0), "k": Param(2, "[1, N]", integer=True)},
    reference="Wang, Dimitriadis et al., Localizing Task Information ... (TALL masks, "
    "consensus merging), ICML 2024 (arXiv 2405.07813)",
    elementwise=True,
)
def consensus(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    weight: torch.Tensor,
    tall_lambda: torch.Tensor,
    k: float,
    **params: float,
) -> torch.Tensor:
    """τ_MTL = Σ wₜτₜ; mₜ = [|τₜ| > λₜ|τ_MTL − τₜ|]; θ = θ₀ + λ · [Σₜ mₜ ≥ k] ⊙ τ_MTL."""
    tau = tensors - base
    tau_mtl = weighted_sum(tau, weight)
    votes = tall_masks(tau, tau_mtl, tall_lambda).sum(0)
    return base + params["lambda"] * tau_mtl * (votes >= k)
