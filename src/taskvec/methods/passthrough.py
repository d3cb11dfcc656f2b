"""Passthrough: copy one input unchanged (optionally scaled), e.g. for layer stacking."""

from __future__ import annotations

import torch

from taskvec.errors import NumericError
from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method


@merge_method(
    "passthrough",
    base="unused",
    per_model={"scale": Param(1.0)},
    reference="mergekit's passthrough (frankenmerges via slices)",
    elementwise=True,
)
def passthrough(
    tensors: torch.Tensor, base: torch.Tensor | None, *, scale: torch.Tensor
) -> torch.Tensor:
    """θ = scale · θ₁ (exactly one input per tensor)."""
    if tensors.shape[0] != 1:
        raise NumericError(f"passthrough takes exactly one model per slice, got {tensors.shape[0]}")
    return tensors[0] if float(scale[0]) == 1.0 else tensors[0] * float(scale[0])
