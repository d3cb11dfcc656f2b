"""WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099), optimised in Gram space.

The loss of one weight matrix is L(τ_m) = Σᵢ wᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F with wᵢ = 1/‖τᵢ‖²_F. It is
quadratic, with gradient ∇L = 2 Σᵢ wᵢ (τ_m − τᵢ) Gᵢ, Gᵢ = τᵢᵀ τᵢ. Writing τ_m = τ₀ + D with
τ₀ = Σᵢ τᵢ (the starting point) gives ∇L = 2 (C₀ + D A), where A = Σᵢ wᵢ Gᵢ (in × in) and
C₀ = Σᵢ wᵢ (τ₀ − τᵢ) Gᵢ are computed once. Each Adam step then costs one (out × in)·(in × in)
product instead of the reference's T products of size (out × in)·(in × out) in the forward pass
and twice that in the backward pass, and the small displacement D keeps the gradient accurate
(no cancellation between τ_m A and Σ wᵢ τᵢ Gᵢ). When in > 2·T·out the rank-(T·out) factor
R = [√wᵢ τᵢ] is used instead of A (D A = (D Rᵀ) R). Adam is torch's (β = 0.9, 0.999, ε = 1e-8,
no weight decay), applied to the same iterates as the reference, so the result equals the
reference's up to floating-point rounding.
"""

from __future__ import annotations

import math

import torch

from taskvec import blas
from taskvec.errors import ConfigError
from taskvec.methods.registry import merge_method
from taskvec.methods.spectral import Tasks, is_matrix, mean_rule

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def wudi_loss(merged: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Σᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F (tasks with τᵢ = 0 contribute 0)."""
    norms = taus.reshape(taus.shape[0], -1).square().sum(1)
    live = norms > 0
    product = (merged - taus[live]) @ taus[live].mT
    return (product.square().sum((1, 2)) / norms[live]).sum()


def wudi_delta(tasks: Tasks, steps: int, lr: float) -> torch.Tensor:
    """The WUDI merged task matrix after ``steps`` Adam steps (τᵢ made one at a time)."""
    t, (out, inp) = tasks.t, tasks.shape
    start, norms = tasks.total_and_norms()
    live = [i for i in range(t) if norms[i] > 0]
    if steps == 0 or not live:
        return start
    weights = {i: 1.0 / norms[i] ** 2 for i in live}
    dense = inp <= 2 * len(live) * out
    a = start.new_zeros(inp, inp) if dense else None
    rows = []
    c0 = torch.zeros_like(start)
    for i in live:
        tau = tasks(i)
        if dense:
            gram = blas.mm(tau.mT, tau)
            a.add_(gram, alpha=weights[i])
            blas.addmm_(c0, start - tau, gram, alpha=weights[i])
        else:
            rows.append(tau * math.sqrt(weights[i]))
            blas.addmm_(c0, blas.mm(start - tau, tau.mT), tau, alpha=weights[i])
        del tau
    r = None if dense else torch.cat(rows)  # (T·out, in): A = rᵀ r
    del rows
    d, m, v = torch.zeros_like(start), torch.zeros_like(start), torch.zeros_like(start)
    g = torch.empty_like(start)  # the gradient, then (once m and v have it) Adam's denominator
    for step in range(1, steps + 1):
        if a is not None:
            blas.mm(d, a, out=g)
        else:
            blas.mm(blas.mm(d, r.mT), r, out=g)
        g.add_(c0).mul_(2.0)
        m.mul_(BETA1).add_(g, alpha=1 - BETA1)
        v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        torch.sqrt(v, out=g).div_(math.sqrt(1 - BETA2**step)).add_(EPS)
        d.addcdiv_(m, g, value=-lr / (1 - BETA1**step))
    return start.add_(d)


@merge_method(
    "wudi",
    base="required",
    globals={"steps": 300, "lr": 1e-5},
    reference="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free "
    "Model Merging via Task Vectors, ICML 2025 (arXiv 2503.08099)",
    wants_name=True,
)
def wudi(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    steps: float,
    lr: float,
    name: str | None = None,
) -> torch.Tensor:
    """θ = θ₀ + τ_m, τ_m = Adam-argmin Σᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F started at Σᵢ τᵢ.

    WUDI-Merging (Cheng et al., ICML 2025), for each 2-D, non-embedding tensor:
    `steps` full-batch Adam steps (learning rate `lr`, β = (0.9, 0.999), ε = 1e-8, no weight
    decay) from the task-arithmetic sum, as in the reference code (300 steps, lr 1e-5;
    FusionBench uses 400 steps). There is no scaling coefficient. Other tensors:
    θ₀ + mean(τᵢ). Computed exactly in Gram space (see the module docstring); a model equal
    to the base (τᵢ = 0, where the reference divides 0 by 0) is left out of the loss.
    """
    if steps < 0 or steps != int(steps):
        raise ConfigError(f"steps must be a whole number ≥ 0, got {steps!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"lr must be a finite number ≥ 0, got {lr!r}")
    if not is_matrix(tensors, name):
        return mean_rule(tensors, base, 1.0)
    delta = wudi_delta(Tasks(tensors, base), int(steps), float(lr))
    return torch.add(base, delta.to(base.dtype))
