"""RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): Linear layers merged by least squares on
their inputs' Gram matrices."""

from __future__ import annotations

import torch

from taskvec.errors import NumericError
from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method


@merge_method(
    "regmean",
    base="optional",
    globals={"alpha": Param(0.95, "[0, 1]")},
    reference="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, "
    "ICLR 2023 (arXiv 2212.09849)",
    wants_name=True,
    statistics="gram",
)
def regmean(
    tensors: torch.Tensor,
    base: torch.Tensor | None,
    *,
    alpha: float,
    stats: torch.Tensor | None,
    name: str | None = None,
) -> torch.Tensor:
    """W = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ per Linear weight, G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ); others: the mean.

    Gᵢ = XᵢᵀXᵢ / n is the Gram matrix of the layer's inputs on model i's data (`taskvec stats
    --kind gram`, named per model by `statistics:`). W minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² (torch's
    layout, y = x Wᵀ) with the off-diagonal entries of each Gᵢ scaled by α (`alpha`,
    FusionBench's `reduce_non_diagonal_ratio`: 0.95 there and here; the paper uses 0.9).
    Computed in float64 with a linear solve, not an explicit inverse. Tensors without a Gram
    matrix (biases, norms, embeddings) are the plain mean of the models, as in the reference
    code. A `base_model` is not merged (the paper merges the fine-tuned models alone).
    """
    if stats is None:
        return tensors.mean(0)
    d = stats.shape[-1]
    lhs = torch.zeros((d, d), dtype=torch.float64, device=tensors.device)
    rhs = torch.zeros((d, tensors.shape[1]), dtype=torch.float64, device=tensors.device)
    for gram, weight in zip(stats, tensors, strict=True):
        shrunk = gram.double().mul_(alpha)
        shrunk.diagonal().copy_(gram.diagonal())
        lhs += shrunk
        rhs.addmm_(shrunk, weight.double().T)
        del shrunk
    merged, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0:
        raise NumericError(
            f"regmean: the summed Gram matrix of {name or 'a tensor'} is singular (an input "
            "feature is zero on every model's data)"
        )
    return merged.T.to(tensors.dtype)
