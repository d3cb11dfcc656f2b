"""Weighted averaging and task arithmetic."""

from __future__ import annotations

import torch

from taskvec.errors import NumericError
from taskvec.methods.params import REQUIRED, Param
from taskvec.methods.registry import merge_method
from taskvec.methods.sparsify import RESCALE_MODES


def weighted_sum(
    tensors: torch.Tensor, weight: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """Σᵢ wᵢ xᵢ over the first axis, accumulated in a fixed order (into ``tensors[0]`` when
    ``in_place``)."""
    out = tensors[0].mul_(float(weight[0])) if in_place else tensors[0] * weight[0]
    for i in range(1, tensors.shape[0]):
        out.add_(tensors[i], alpha=float(weight[i]))
    return out


def _total(weight: torch.Tensor) -> float:
    total = float(weight.sum())
    if total == 0.0:
        raise NumericError("weights sum to zero, so they cannot be normalized (normalize: false?)")
    return total


@merge_method(
    "linear",
    base="unused",
    per_model={"weight": Param(REQUIRED)},
    globals={"normalize": True},
    reference="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
    elementwise=True,
)
def linear(
    tensors: torch.Tensor, base: torch.Tensor | None, *, weight: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ  (without the division when normalize is false).

    linear has no base role. As in mergekit, a `base_model` that `models` does not list is
    averaged in as one more input θ_{N+1} (its weight comes from the top-level parameters), so
    with top-level `weight: w` θ = (Σᵢ wᵢ θᵢ + w θ₀) / (Σᵢ wᵢ + w); list only the models to
    average and leave `base_model` out to exclude it. Weights summing to 0 with normalize is
    an error (mergekit divides by zero).
    """
    out = weighted_sum(tensors, weight, in_place=True)  # tensors is the call's own buffer
    return out.div_(_total(weight)) if normalize else out


@merge_method(
    "task_arithmetic",
    base="required",
    per_model={"weight": Param(REQUIRED), "density": Param(1.0, "(0, 1]")},
    globals={
        "lambda": Param(1.0),
        "normalize": False,
        "int8_mask": False,
        "rescale": Param(False, choices=RESCALE_MODES),
    },
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
    density: torch.Tensor,
    rescale: bool | str,
    **params: float,
) -> torch.Tensor:
    """θ = θ₀ + λ Σᵢ wᵢ (θᵢ − θ₀)  (divided by Σᵢ wᵢ when normalize is true).

    Negative weights subtract a task vector (negation / unlearning). ``int8_mask`` only changes
    the storage of mergekit's internal masks and has no numerical effect here. ``density`` and
    ``rescale`` are accepted and ignored, as in mergekit (whose task arithmetic is its
    generalized task arithmetic without sparsification): use ties, dare_linear or breadcrumbs
    to sparsify.
    """
    scale = params["lambda"] / (_total(weight) if normalize else 1.0)
    coefficients = weight.double() * scale
    # = θ₀ + Σᵢ cᵢ(θᵢ − θ₀) with cᵢ = λwᵢ (/Σw), as (1 − Σcᵢ)θ₀ + Σcᵢθᵢ: four passes, not eight
    merged = weighted_sum(tensors, coefficients, in_place=True)  # the call's own buffer
    return merged.add_(base, alpha=1.0 - float(coefficients.sum()))
