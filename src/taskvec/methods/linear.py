"""Weighted averaging and task arithmetic."""

from __future__ import annotations

import torch

from taskvec.errors import NumericError
from taskvec.methods.registry import REQUIRED, merge_method


def weighted_sum(tensors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ xᵢ over the first axis, accumulated in a fixed order."""
    out = tensors[0] * weight[0]
    for i in range(1, tensors.shape[0]):
        out.add_(tensors[i], alpha=float(weight[i]))
    return out


def _divide_by_total(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    total = float(weight.sum())
    if total == 0.0:
        raise NumericError("weights sum to zero, so they cannot be normalized (normalize: false?)")
    return x / total


@merge_method(
    "linear",
    base="unused",
    per_model={"weight": REQUIRED},
    globals={"normalize": True},
    reference="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
    elementwise=True,
)
def linear(
    tensors: torch.Tensor, base: torch.Tensor | None, *, weight: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ  (without the division when normalize is false).

    Only the models listed under `models` are averaged; a `base_model` that is not listed
    there only supplies the config and tokenizer. Weights summing to 0 with normalize is an
    error (mergekit divides by zero).
    """
    out = weighted_sum(tensors, weight)
    return _divide_by_total(out, weight) if normalize else out


@merge_method(
    "task_arithmetic",
    base="required",
    per_model={"weight": REQUIRED},
    globals={"lambda": 1.0, "normalize": False, "int8_mask": False},
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
    elementwise=True,
)
def task_arithmetic(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    weight: torch.Tensor,
    normalize: bool,
    int8_mask: bool,
    **params: float,
) -> torch.Tensor:
    """θ = θ₀ + λ Σᵢ wᵢ (θᵢ − θ₀)  (divided by Σᵢ wᵢ when normalize is true).

    Negative weights subtract a task vector (negation / unlearning). ``int8_mask`` only changes
    the storage of mergekit's internal masks and has no numerical effect here.
    """
    delta = weighted_sum(tensors - base, weight)
    if normalize:
        delta = _divide_by_total(delta, weight)
    return base + params["lambda"] * delta
