"""Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832): averages weighted per entry
by each model's diagonal Fisher information."""

from __future__ import annotations

from typing import Any

import torch

from taskvec.errors import NumericError
from taskvec.methods.linear import _total, weighted_sum
from taskvec.methods.params import Param
from taskvec.methods.registry import WholeModelPass, merge_method


def _squares(
    tensors: torch.Tensor, base: torch.Tensor | None, *, stats: torch.Tensor | None, **_: Any
) -> torch.Tensor:
    """Each model's Σ Fᵢ² over one tensor, ``(N,)`` (zero for a tensor without a Fisher)."""
    if stats is None:
        return torch.zeros(tensors.shape[0], dtype=torch.float64)
    return stats.double().square().flatten(1).sum(1).cpu()


def _norms(total: torch.Tensor, **_: Any) -> dict[str, Any]:
    return {"fisher_norms": total.sqrt()}


@merge_method(
    "fisher",
    base="optional",
    per_model={"weight": Param(1.0, "[0, inf)")},
    globals={
        "fisher_floor": Param(1e-6, "(0, inf)"),
        "normalize": False,
        "favor_target_model": False,
    },
    reference="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 "
    "(arXiv 2111.09832)",
    whole_model=WholeModelPass(_squares, _norms, wanted=lambda normalize, **_: normalize),
    statistics="fisher",
)
def fisher(
    tensors: torch.Tensor,
    base: torch.Tensor | None,
    *,
    weight: torch.Tensor,
    fisher_floor: float,
    normalize: bool,
    favor_target_model: bool,
    stats: torch.Tensor | None,
    fisher_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ = Σᵢ λᵢ F̂ᵢ θᵢ / Σᵢ λᵢ F̂ᵢ per entry, F̂ᵢ = max(Fᵢ, ε); no Fisher: Σᵢ λᵢ θᵢ / Σᵢ λᵢ.

    Fᵢ is model i's diagonal Fisher (`taskvec stats --kind fisher`, named per model by
    `statistics:`), λᵢ the per-model `weight` (1 by default) and ε the `fisher_floor` (1e-6, as
    the paper's code), which keeps the denominator positive. The paper's code floors only the
    first model's Fisher (its "target" model; `favor_target_model: true`); by default every
    model's is floored, so the order of the models does not matter. With `normalize: true`
    (the default of the paper's code and of FusionBench) each λᵢ is divided by ‖Fᵢ‖₂, the L2
    norm of model i's whole Fisher (a streamed first pass over the statistics). Tensors
    without a Fisher are the λ-weighted mean. A `base_model` is not merged.
    """
    if stats is None:
        return weighted_sum(tensors, weight.to(tensors.dtype), in_place=True) / _total(weight)
    lam = weight
    if normalize:
        assert fisher_norms is not None
        if not bool((fisher_norms > 0).all()):
            raise NumericError("fisher: a model's Fisher is zero everywhere (normalize: false?)")
        lam = weight / fisher_norms.to(weight.device)
    floored = stats.to(tensors.dtype)
    (floored[:1] if favor_target_model else floored).clamp_(min=fisher_floor)
    coeff = floored.mul_(lam.to(tensors.dtype).view(-1, *[1] * (tensors.dim() - 1)))
    return tensors.mul_(coeff).sum(0).div_(coeff.sum(0))
