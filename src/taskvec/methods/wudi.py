"""WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099), optimised in Gram space.

The loss of one weight matrix is L(τ_m) = Σᵢ wᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F with wᵢ = 1/‖τᵢ‖²_F. It is
quadratic, with gradient ∇L = 2 Σᵢ wᵢ (τ_m − τᵢ) Gᵢ, Gᵢ = τᵢᵀ τᵢ. Writing τ_m = τ₀ + D with
τ₀ = Σᵢ τᵢ (the starting point) gives ∇L = 2 (C₀ + D A), where A = Σᵢ wᵢ Gᵢ (in × in) and
C₀ = Σᵢ wᵢ (τ₀ − τᵢ) Gᵢ are computed once. An exact Adam step then costs one (out × in)·(in × in)
product instead of the reference's T products of size (out × in)·(in × out) in the forward pass
and twice that in the backward pass. When in > 2·T·out the rank-(T·out) factor R = [√wᵢ τᵢ] is
used instead of A (D A = (D Rᵀ) R). Adam is torch's (β = 0.9, 0.999, ε = 1e-8, no weight decay).

Even so, 300 exact steps on a 1.1B Llama cost ≈ 1.8 PFLOP (≈ 2 h on 2 CPU cores). With
``step_tol`` > 0 the product D A is formed only at the ends of *windows* of steps; inside a
window the change since its start, (D − D_s) A, uses the model Ã = σ I + Q diag(λ − σ) Qᵀ:
Q spans A's dominant subspace (randomised subspace iteration of rank ``gram_rank``, fixed seed,
less the directions whose eigenvalue is within ``KEEP_GAP`` of the top one's gap to σ), λ are
its eigenvalues and σ is the mean of A's others (from tr A = the number of tasks). At a
window's end the exact gradient is updated with the product of the window's increment alone
(in bfloat16 for float32 work: its ≈ 0.3% error applies to the increment, not to D A) and
compared with the modelled one. The error's effect on an Adam step, RMS over entries of
|ĝ − g| / (√v̂ + ε), is in units of the learning rate; a window where it exceeds ``step_tol`` is
undone and rerun shorter, and the next window's length follows the error (an error controller,
as in adaptive ODE solvers). ``step_tol = 0`` takes every step with the exact float32 gradient:
the reference's trajectory up to rounding.

Rows of τ_m are independent given A, so they are optimised in chunks of ``CHUNK_ELEMENTS``
entries (each with its own windows), which bounds the working set: for a tall matrix (in ≤ out,
e.g. an lm_head) C₀'s rows are made chunk by chunk from the tasks' Gram matrices, and the
result is the only full-size matrix held.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from taskvec import blas
from taskvec.errors import ConfigError
from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method
from taskvec.methods.spectral import Tasks, is_matrix, mean_rule

log = logging.getLogger(__name__)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
CHUNK_ELEMENTS = 1 << 22  # rows optimised together: bounds the ≈ 12 work matrices (16 MiB each)
BLOCK_ELEMENTS = 1 << 19  # Adam's row blocks (2 MiB of float32 per array): measured best
FIRST_WINDOW, LONGEST_WINDOW = 8, 64
POWER_ITERATIONS = 2
KEEP_GAP = 0.05


def wudi_loss(merged: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Σᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F (tasks with τᵢ = 0 contribute 0)."""
    norms = taus.reshape(taus.shape[0], -1).square().sum(1)
    live = norms > 0
    product = (merged - taus[live]) @ taus[live].mT
    return (product.square().sum((1, 2)) / norms[live]).sum()


class GramOperator:
    """x ↦ x A for A = Σᵢ wᵢ τᵢᵀ τᵢ, held as A itself or, when that is larger, as R = [√wᵢ τᵢ].
    ``add_coarse`` multiplies in bfloat16 with float32 accumulation (≈ 0.3% relative error,
    4× the speed on CPUs with AVX-512 BF16) when A is float32, a row block at a time."""

    def __init__(self, a: torch.Tensor | None, r: torch.Tensor | None) -> None:
        held = a if a is not None else r
        assert held is not None
        self.factored, self.held = a is None, held
        self.low = torch.bfloat16 if held.dtype == torch.float32 else held.dtype
        self._low: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.factored:
            return blas.mm(blas.mm(x, self.held.mT), self.held, out=out)
        return blas.mm(x, self.held, out=out)

    def add_coarse(
        self, out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, rows: list[slice]
    ) -> None:
        """out += (x − x₀) A, in ``self.low`` precision, one block of ``rows`` at a time."""
        if self.low == x.dtype:
            out.add_(self(x - x0))
            return
        if self._low is None:
            self._low = self.held.to(self.low)
        held = self._low
        for sl in rows:
            y = torch.sub(x[sl], x0[sl]).to(self.low)
            out[sl].add_(y @ held.mT @ held if self.factored else y @ held)


@dataclass(frozen=True)
class IncrementModel:
    """Ã = σ I + Q diag(λ − σ) Qᵀ (Q orthonormal, ``gap`` = λ − σ; no columns: Ã = σ I)."""

    q: torch.Tensor
    gap: torch.Tensor
    sigma: float

    def half_gradient(
        self, out: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor, x0_q: torch.Tensor
    ) -> None:
        """out = anchor + σ x + (x − x₀) Q diag(λ − σ) Qᵀ, i.e. ∇/2 = C₀ + x₀ A + (x − x₀) Ã
        with anchor = C₀ + x₀ A − σ x₀ and x₀ Q given."""
        if self.q.shape[1]:
            torch.addmm(anchor, (x @ self.q).sub_(x0_q).mul_(self.gap), self.q.mT, out=out)
        else:
            out.copy_(anchor)
        if self.sigma:
            out.add_(x, alpha=self.sigma)


def increment_model(
    apply_a: GramOperator, trace: float, n: int, rank: int, like: torch.Tensor
) -> IncrementModel:
    """A's dominant subspace by randomised subspace iteration (fixed seed: reproducible); its
    directions whose eigenvalue is within ``KEEP_GAP`` of the top one's gap to σ go to σ."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(rank, n, generator=gen, dtype=like.dtype).to(like.device)
    for _ in range(POWER_ITERATIONS):
        y = torch.linalg.qr(apply_a(y).mT).Q.mT  # rows: an orthonormal basis of span(y A)
    q = y.mT.contiguous()
    b = apply_a(y) @ q
    lam, w = torch.linalg.eigh((b + b.mT) / 2)  # A ≈ (Q W) diag(λ) (Q W)ᵀ on span(Q)
    sigma = max(trace - float(lam.sum()), 0.0) / (n - rank)
    keep = (lam - sigma) >= KEEP_GAP * float(lam.max() - sigma)
    sigma = max(trace - float(lam[keep].sum()), 0.0) / (n - int(keep.sum()))
    return IncrementModel((q @ w[:, keep]).contiguous(), lam[keep] - sigma, sigma)


class BlockAdam:
    """torch's fused Adam on a matrix, row block by row block: a block takes all the steps of
    a window while its parameters, gradient and moments stay in cache. It is fed ∇/2 with
    ε/2, which is Adam on ∇ with ε exactly. ``snapshot`` and ``restore`` undo a window."""

    def __init__(self, param: torch.Tensor, lr: float) -> None:
        self.param, self.half_grad = param, torch.empty_like(param)
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        rows = max(1, BLOCK_ELEMENTS // max(param.shape[1], 1))
        self.rows = [slice(r, r + rows) for r in range(0, param.shape[0], rows)]
        self.opts = []
        fused = param.device.type in ("cpu", "cuda")
        for sl in self.rows:
            p = param[sl]
            p.grad = self.half_grad[sl]
            opt = torch.optim.Adam([p], lr=lr, betas=(BETA1, BETA2), eps=EPS / 2, fused=fused)
            step = torch.zeros((), dtype=torch.float32, device=param.device)
            opt.state[p] = {"step": step, "exp_avg": self.m[sl], "exp_avg_sq": self.v[sl]}
            self.opts.append(opt)
        self.steps = 0
        self._saved: tuple[torch.Tensor, ...] = ()
        self._saved_steps = 0

    def snapshot(self) -> None:
        if not self._saved:
            self._saved = tuple(torch.empty_like(x) for x in (self.param, self.m, self.v))
        for saved, x in zip(self._saved, (self.param, self.m, self.v), strict=True):
            saved.copy_(x)
        self._saved_steps = self.steps

    @property
    def saved_param(self) -> torch.Tensor:
        return self._saved[0]

    def restore(self) -> None:
        for saved, x in zip(self._saved, (self.param, self.m, self.v), strict=True):
            x.copy_(saved)
        self.steps = self._saved_steps
        for opt in self.opts:
            for state in opt.state.values():
                state["step"].fill_(self.steps)

    def step_error(self, half_grad_error: torch.Tensor) -> float:
        """RMS over entries of e / (√v̂ + ε) for a gradient error e = 2 · ``half_grad_error``
        (overwritten), v̂ = v / (1 − β₂ᵗ) in ∇ units: how far the error moves a step, in
        units of the learning rate."""
        scale = 2.0 / math.sqrt(1 - BETA2**self.steps)
        total = 0.0
        for sl in self.rows:
            den = torch.sqrt(self.v[sl]).mul_(scale).add_(EPS)
            total += float(half_grad_error[sl].mul(2.0).div_(den).square().sum())
        return math.sqrt(total / half_grad_error.numel())


@dataclass
class WindowStats:
    """How a run went: exact products (of a row chunk: the most), undone windows, worst
    accepted step error."""

    products: int = 0
    rejected: int = 0
    max_error: float = 0.0

    def merge(self, other: WindowStats) -> None:
        self.products = max(self.products, other.products)
        self.rejected += other.rejected
        self.max_error = max(self.max_error, other.max_error)


def wudi_delta(
    tasks: Tasks, steps: int, lr: float, step_tol: float = 0.0, gram_rank: int = 0
) -> tuple[torch.Tensor, WindowStats]:
    """The WUDI merged task matrix after ``steps`` Adam steps (τᵢ made one at a time)."""
    t, (out, inp) = tasks.t, tasks.shape
    norms = tasks.norms()
    live = [i for i in range(t) if norms[i] > 0]
    stats = WindowStats()
    if steps == 0 or not live:
        return tasks.total(), stats
    weights = [1.0 / norms[i] ** 2 for i in live]
    tall = inp <= out  # C₀ by row chunks from the tasks' Gram matrices (T·in² ≤ T·out·in)
    grams: list[torch.Tensor] = []
    factor: list[torch.Tensor] = []
    if tall:
        result = torch.empty(out, inp, dtype=tasks.dtype, device=tasks.base.device)
        c0 = None
        for i in live:
            tau = tasks(i)
            grams.append(blas.mm(tau.mT, tau))
            del tau
        a = sum(g * w for g, w in zip(grams, weights, strict=True))
    else:  # C₀ in the cheaper order ((τ₀ − τᵢ) τᵢᵀ) τᵢ, on whole matrices (out < in: small)
        start = tasks.total()
        a = start.new_zeros(inp, inp) if inp <= 2 * len(live) * out else None
        c0 = result = torch.zeros_like(start)
        for i, w in zip(live, weights, strict=True):
            tau = tasks(i)
            if a is not None:
                a.add_(blas.mm(tau.mT, tau), alpha=w)
            else:
                factor.append(tau * math.sqrt(w))
            blas.addmm_(c0, blas.mm(start - tau, tau.mT), tau, alpha=w)
            del tau
        del start
    apply_a = GramOperator(a, torch.cat(factor) if factor else None)
    del factor, a
    approximate = step_tol > 0 and 0 < 2 * gram_rank < inp
    model = (
        increment_model(apply_a, float(len(live)), inp, gram_rank, result)
        if approximate
        else IncrementModel(result.new_zeros(inp, 0), result.new_zeros(0), 0.0)
    )
    for rows in _chunks(out, inp):  # rows are independent given A
        if c0 is None:  # tall: C₀'s rows, made in the rows of the result they will become
            total = tasks.total(rows)
            c0_rows = result[rows].zero_()
            for i, g, w in zip(live, grams, weights, strict=True):
                blas.addmm_(c0_rows, total - tasks(i, rows), g, alpha=w)
        else:
            c0_rows, total = c0[rows], None
        d, chunk = adam_rows(c0_rows, apply_a, model, steps, lr, step_tol if approximate else 0)
        stats.merge(chunk)
        result[rows] = (tasks.total(rows) if total is None else total).add_(d)  # Σ τᵢ + D
    return result, stats


def _chunks(out: int, inp: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // inp)
    return [slice(r, r + step) for r in range(0, out, step)]


def adam_rows(
    c0: torch.Tensor,
    apply_a: GramOperator,
    model: IncrementModel,
    steps: int,
    lr: float,
    step_tol: float,
) -> tuple[torch.Tensor, WindowStats]:
    """D after ``steps`` Adam steps on rows with ∇/2 = C₀ + D A (``c0``: those rows of C₀,
    overwritten), in windows of modelled steps when ``step_tol`` > 0."""
    stats = WindowStats()
    approximate = step_tol > 0
    d = torch.zeros_like(c0)
    adam = BlockAdam(d, lr)
    # ∇/2 = C₀ + D_s A at the window's start (D_s = D there, 0 at first), the anchor
    # C₀ + D_s A − σ D_s, and a buffer for the next ∇/2: preallocated, as the loop runs long
    exact, spare = c0, torch.empty_like(c0)
    anchor = torch.empty_like(c0) if model.sigma else exact
    if not approximate:
        c0 = c0.clone()  # every step's ∇/2 is C₀ + D A
    window = FIRST_WINDOW if approximate else 1
    while adam.steps < steps:
        n = min(window, steps - adam.steps)
        if approximate:
            adam.snapshot()
        d0_q = d @ model.q
        if model.sigma:
            torch.sub(exact, d, alpha=model.sigma, out=anchor)
        for sl, opt in zip(adam.rows, adam.opts, strict=True):
            for _ in range(n):
                model.half_gradient(adam.half_grad[sl], anchor[sl], d[sl], d0_q[sl])
                opt.step()
        adam.steps += n
        stats.products += 1
        if not approximate:
            exact, spare = apply_a(d, out=spare).add_(c0), exact
            anchor = exact
            continue
        # ∇/2 at the window's end, from the bf16 product of the window's increment only
        new_exact = spare.copy_(exact)
        apply_a.add_coarse(new_exact, d, adam.saved_param, adam.rows)
        modelled = adam.half_grad
        model.half_gradient(modelled, anchor, d, d0_q)
        error = adam.step_error(modelled.sub_(new_exact))
        if error > step_tol and n > 1:
            adam.restore()
            stats.rejected += 1
            window = max(1, int(n * 0.5 * step_tol / error))
            continue
        if n > 1:  # a one-step window took the exact gradient
            stats.max_error = max(stats.max_error, error)
        grow = 0.8 * step_tol / max(error, 1e-30)
        window = max(1, min(LONGEST_WINDOW, int(n * min(2.0, grow))))
        exact, spare = new_exact, exact
        if not model.sigma:
            anchor = exact
    return d, stats


@merge_method(
    "wudi",
    base="required",
    globals={
        "steps": Param(300, "[0, inf)", integer=True),
        "lr": Param(1e-5, "[0, inf)"),
        "step_tol": Param(0.1, "[0, 1)"),
        "gram_rank": Param(32, "[0, inf)", integer=True),
    },
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
    step_tol: float,
    gram_rank: float,
    name: str | None = None,
) -> torch.Tensor:
    """θ = θ₀ + τ_m, τ_m = Adam-argmin Σᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F started at Σᵢ τᵢ.

    WUDI-Merging (Cheng et al., ICML 2025), for each 2-D, non-embedding tensor:
    `steps` full-batch Adam steps (learning rate `lr`, β = (0.9, 0.999), ε = 1e-8, no weight
    decay) from the task-arithmetic sum, as in the reference code (300 steps, lr 1e-5;
    FusionBench uses 400 steps). There is no scaling coefficient. Other tensors:
    θ₀ + mean(τᵢ). Computed in Gram space (see the module docstring); a model equal to the
    base (τᵢ = 0, where the reference divides 0 by 0) is left out of the loss.
    `step_tol` bounds the error of the steps taken between exact products, RMS in units of
    `lr` (0: every step exact, the reference's trajectory); `gram_rank` is the rank of the
    model of A used between them; matrices with in ≤ 2·gram_rank are always exact.
    """
    if steps < 0 or steps != int(steps):
        raise ConfigError(f"steps must be a whole number ≥ 0, got {steps!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"lr must be a finite number ≥ 0, got {lr!r}")
    if not (math.isfinite(step_tol) and 0 <= step_tol < 1):
        raise ConfigError(f"step_tol must be a number in [0, 1), got {step_tol!r}")
    if gram_rank < 0 or gram_rank != int(gram_rank):
        raise ConfigError(f"gram_rank must be a whole number ≥ 0, got {gram_rank!r}")
    if not is_matrix(tensors, name):
        return mean_rule(tensors, base, 1.0)
    delta, stats = wudi_delta(
        Tasks(tensors, base), int(steps), float(lr), float(step_tol), int(gram_rank)
    )
    if stats.rejected or stats.max_error:
        log.debug(
            "wudi %s: %d exact products for %d steps, %d window(s) redone, step error ≤ %.2f lr",
            name,
            stats.products,
            int(steps),
            stats.rejected,
            stats.max_error,
        )
    if delta.dtype == base.dtype:
        return delta.add_(base)  # in place: no second full-size matrix
    return torch.add(base, delta.to(base.dtype))
