"""FDA adaptation: fit a block to every expert's anchors and targets (Shi, Wen & Liu 2025, §3.3
of ../shared/notes/methods.md).

Targets are the experts' own outputs on their anchors, y_ij = f_l(x_ij; θ_i). All tasks' anchors
are pooled and shuffled, and the block is trained in mini-batches for some epochs on

    Σ_i Σ_j Dist( f_l(x_ij; θ), y_ij )     with Dist = summed squared error ("mse")
                                           or minus the flattened cosine ("cos").

Two modes, both returning the block's new parameters:

- :func:`adapt_parameters` (from θ0): every parameter of the block is trained, starting at θ0
  (reference: Adam, lr 5e-5, 125 epochs, batch 128, mse, for RoBERTa-base).
- :func:`adapt_coefficients` (from a merge): θ = θ0 + Σ_k A_k ⊙ τ_k with θ0 and the τ_k frozen
  and only the element-wise coefficient tensors A_k trained (reference: Adam, lr 1e-2, 100
  epochs; A_k starts at the merge's coefficient, e.g. 0.3 for task arithmetic or 1.0 for a
  single merged vector from TSV or WUDI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from taskvec.errors import IncompatibleError
from taskvec.fda.anchors import AnchorSet, stack
from taskvec.fda.blocks import Block, Params

Loss = Literal["mse", "cos"]


@dataclass(frozen=True)
class AdaptSettings:
    """Optimisation of the adaptation stage (defaults: the reference's RoBERTa-base values for
    the parameter mode; ``lr`` is replaced by ``coef_lr`` in the coefficient mode)."""

    loss: Loss = "mse"
    lr: float = 5e-5
    coef_lr: float = 1e-2
    epochs: int = 125
    batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("mse", "cos"):
            raise IncompatibleError(f"unknown FDA loss {self.loss!r}; use mse or cos")
        if self.epochs < 0 or self.batch < 1 or self.lr <= 0 or self.coef_lr <= 0:
            raise IncompatibleError("epochs must be ≥ 0, batch ≥ 1 and learning rates > 0")


def targets(block: Block, experts: Sequence[Params], anchors: AnchorSet) -> torch.Tensor:
    """y_ij = f_l(x_ij; θ_i), shaped like the anchors."""
    if len(experts) != len(anchors.tasks):
        raise IncompatibleError("one expert per anchor task is needed for the targets")
    with torch.no_grad():
        return torch.vmap(block.forward)(stack(experts), anchors.anchors)


def distance(out: torch.Tensor, target: torch.Tensor, loss: Loss) -> torch.Tensor:
    if loss == "mse":
        return (out - target).pow(2).sum()
    return -F.cosine_similarity(out.flatten(1), target.flatten(1), dim=1).sum()


def _fit(
    block: Block,
    trainable: list[torch.Tensor],
    params: Callable[[], Params],
    anchors: AnchorSet,
    target: torch.Tensor,
    settings: AdaptSettings,
    lr: float,
    on_epoch: Callable[[int, float], None] | None,
) -> None:
    """Mini-batch Adam over the pooled, shuffled anchors of every task."""
    x = anchors.anchors.flatten(0, 1)
    y = target.flatten(0, 1)
    opt = torch.optim.Adam(trainable, lr=lr)
    g = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for batch in order.split(settings.batch):
            loss = distance(block.forward(params(), x[batch]), y[batch], settings.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        if on_epoch is not None:
            on_epoch(epoch + 1, total)


def adapt_parameters(
    block: Block,
    theta0: Params,
    anchors: AnchorSet,
    target: torch.Tensor,
    settings: AdaptSettings = AdaptSettings(),
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Params:
    """Train every parameter of the block from θ0 on all tasks' anchors (mode a)."""
    theta = {n: v.detach().clone().requires_grad_(True) for n, v in theta0.items()}
    _fit(
        block, list(theta.values()), lambda: theta, anchors, target, settings, settings.lr, on_epoch
    )
    return {n: v.detach() for n, v in theta.items()}


def adapt_coefficients(
    block: Block,
    theta0: Params,
    vectors: Sequence[Params],
    start: float,
    anchors: AnchorSet,
    target: torch.Tensor,
    settings: AdaptSettings = AdaptSettings(),
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Params:
    """Train element-wise coefficients A_k (from ``start``) of frozen vectors τ_k (mode b):
    θ = θ0 + Σ_k A_k ⊙ τ_k."""
    if not vectors:
        raise IncompatibleError("the coefficient mode needs at least one task vector")
    coef = [
        {n: torch.full_like(v, start, requires_grad=True) for n, v in theta0.items()}
        for _ in vectors
    ]

    def params() -> Params:
        return {
            n: theta0[n] + sum(c[n] * tau[n] for c, tau in zip(coef, vectors, strict=True))
            for n in theta0
        }

    trainable = [t for c in coef for t in c.values()]
    _fit(block, trainable, params, anchors, target, settings, settings.coef_lr, on_epoch)
    with torch.no_grad():
        return {n: v.detach() for n, v in params().items()}
