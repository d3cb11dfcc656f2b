"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): merging coefficients learned by
minimising the prediction entropy of the merged model on unlabelled inputs.

θ(λ) = θ₀ + Σᵢ λᵢᵍ τᵢᵍ, one coefficient per task i and group g: task-wise one group, layer-wise
one group per numbered layer (:class:`taskvec.layout.LayerLayout`) plus one for every tensor
outside the layers (embeddings, pooler). The loss is Σₜ H(pₜ), the mean Shannon entropy of
task t's predictions (its own head on the merged body) on a batch of its unlabelled inputs.
λ starts at ``init`` (0.3) and follows Adam (lr 1e-3); with ``clamp`` it is kept in [0, 1]
after each step, as the authors' code (EnnengYang/AdaMerging) does.

The gradient needs no T task vectors in memory: ∂L/∂λᵢᵍ = Σ_{tensors w in g} ⟨∂L/∂θ_w, τᵢ_w⟩.
Each step builds θ(λ) in the one model, back-propagates once to get ∂L/∂θ, then streams the
task vectors tensor by tensor for the dot products, and streams them again to rebuild θ(λ).
Memory: θ₀ + the model and its gradient (≈ 3 models of floats) + one tensor per task +
activations of one batch; the task vectors are read from disk twice a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from taskvec.layout import LayerLayout

Granularity = Literal["layer", "task"]
Precision = Literal["float32", "bfloat16"]
VectorFn = Callable[[str], torch.Tensor]
"""A task vector as a function: parameter name → τ of that parameter (read when called)."""


@dataclass(frozen=True)
class AdaSettings:
    """The optimisation: granularity, steps, Adam's learning rate, initial λ, clamp to [0, 1],
    and the precision of the forward and backward passes: ``bfloat16`` runs them under autocast
    (about twice the matrix-product speed on CPUs with AVX-512 BF16), while θ, λ and
    ⟨∂L/∂θ, τ⟩ stay in float32/float64."""

    granularity: Granularity = "layer"
    steps: int = 500
    lr: float = 1e-3
    init: float = 0.3
    clamp: bool = True
    precision: Precision = "float32"


@dataclass
class AdaResult:
    """Learned coefficients [tasks, groups], the group of each parameter, the merged parameters
    and the loss before each step."""

    coefficients: torch.Tensor
    groups: dict[str, int]
    merged: dict[str, torch.Tensor]
    losses: list[float]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy −Σ_c p_c log p_c of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def groups_of(names: Iterable[str], granularity: Granularity) -> dict[str, int]:
    """Coefficient group of each name: 0 for all (task-wise), or the layer index with every
    tensor outside the layers in one last group (layer-wise)."""
    names = list(names)
    if granularity == "task":
        return dict.fromkeys(names, 0)
    layout = LayerLayout.infer(names)
    return {
        n: layer if (layer := layout.split(n)[0]) is not None else layout.num_layers for n in names
    }


def _rebuild(
    params: Mapping[str, torch.nn.Parameter],
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[VectorFn],
    lam: torch.Tensor,
    groups: Mapping[str, int],
) -> None:
    """Write θ(λ) = θ₀ + Σᵢ λᵢᵍ τᵢ into ``params``, one tensor (of each task) at a time."""
    with torch.no_grad():
        for name, p in params.items():
            theta = p if p.dtype == torch.float32 else torch.empty(p.shape)
            theta.copy_(base[name])
            for i, tau in enumerate(vectors):
                theta.add_(tau(name), alpha=float(lam[i, groups[name]]))
            if theta is not p:
                p.copy_(theta)


def coefficient_grad(
    params: Mapping[str, torch.nn.Parameter],
    vectors: Sequence[VectorFn],
    groups: Mapping[str, int],
) -> torch.Tensor:
    """∂L/∂λᵢᵍ = Σ_{w in g} ⟨∂L/∂θ_w, τᵢ_w⟩ from the gradients in ``params`` (streamed τ)."""
    n_groups = max(groups.values(), default=-1) + 1
    grad = torch.zeros(len(vectors), n_groups, dtype=torch.float64)
    for name, p in params.items():
        if p.grad is None:
            continue
        if p.grad.is_sparse:  # an embedding: only the rows of the batch's tokens have a gradient
            g = p.grad.coalesce()
            rows, values = g.indices()[0], g.values().float().flatten()
            for i, tau in enumerate(vectors):
                dot = torch.dot(values, tau(name)[rows].float().flatten())
                grad[i, groups[name]] += float(dot)
            continue
        g = p.grad.float().flatten()
        for i, tau in enumerate(vectors):
            grad[i, groups[name]] += float(torch.dot(g, tau(name).float().flatten()))
    return grad


def _precision(model: torch.nn.Module, precision: Precision) -> AbstractContextManager[Any]:
    """Autocast of the loss's forward pass (its backward follows it) for ``bfloat16``."""
    if precision == "float32":
        return nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


@contextmanager
def _learning(model: torch.nn.Module, precision: Precision) -> Iterator[None]:
    """The model while λ is learned. Embeddings give sparse gradients (the rows of the batch's
    tokens): a dense one zero-fills the whole vocabulary matrix once per forward pass. Under
    ``bfloat16`` a Hugging Face model uses eager attention: the CPU's fused attention is many
    times slower backwards in bfloat16 than the plain matrix products."""
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and not m.sparse]
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    switch = (
        precision == "bfloat16"
        and attention not in (None, "eager")
        and hasattr(model, "set_attn_implementation")  # older transformers: left as it is
    )
    for m in dense:
        m.sparse = True
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        for m in dense:
            m.sparse = False
        if switch:
            model.set_attn_implementation(attention)  # type: ignore[operator]


def adamerging(
    model: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[VectorFn],
    loss: Callable[[int], torch.Tensor],
    settings: AdaSettings = AdaSettings(),
    *,
    progress: bool = False,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AdaResult:
    """Learn λ for the parameters of ``model`` named in ``base`` (θ₀ by parameter name; every
    other parameter, such as a task's head, is left alone and not trained).

    ``vectors[i](name)`` is task i's τ of parameter ``name``; ``loss(step)`` runs ``model``
    (already holding θ(λ)) on the step's batches and returns the scalar loss, e.g.
    Σₜ :func:`entropy` of task t's head on its batch. ``project`` (λ → λ), when given, replaces
    the clamp after each step (e.g. onto the simplex).
    """
    params = {n: p for n, p in model.named_parameters() if n in base}
    for n, p in model.named_parameters():
        p.requires_grad_(n in base)
    groups = groups_of(params, settings.granularity)
    n_groups = max(groups.values(), default=-1) + 1
    lam = torch.full((len(vectors), n_groups), settings.init, dtype=torch.float64)
    lam.requires_grad_(True)
    optimizer = torch.optim.Adam([lam], lr=settings.lr)
    losses: list[float] = []
    _rebuild(params, base, vectors, lam.detach(), groups)
    bar = tqdm(range(settings.steps), desc="adamerging", unit="step", disable=not progress)
    with _learning(model, settings.precision):
        for step in bar:
            model.zero_grad(set_to_none=True)
            with _precision(model, settings.precision):
                value = loss(step)
            value.backward()
            losses.append(float(value.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            lam.grad = coefficient_grad(params, vectors, groups)
            optimizer.step()
            with torch.no_grad():
                if project is not None:
                    lam.copy_(project(lam.detach()))
                elif settings.clamp:
                    lam.clamp_(0.0, 1.0)
            _rebuild(params, base, vectors, lam.detach(), groups)
    model.zero_grad(set_to_none=True)
    merged = {n: p.detach().clone() for n, p in params.items()}
    return AdaResult(lam.detach().clone(), groups, merged, losses)
