"""MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322)."""

from __future__ import annotations

import torch

from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method


@merge_method(
    "magmax",
    base="required",
    globals={"lambda": Param(1.0)},
    reference="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual "
    "Learning, ECCV 2024 (arXiv 2407.06322)",
    elementwise=True,
)
def magmax(tensors: torch.Tensor, base: torch.Tensor, **params: float) -> torch.Tensor:
    """Per entry, the task-vector value of largest magnitude: θ = θ₀ + λ τ_{argmaxᵢ |τᵢ|}."""
    tau = tensors - base
    pick = tau.abs().argmax(0, keepdim=True)
    return base + params["lambda"] * tau.gather(0, pick).squeeze(0)
