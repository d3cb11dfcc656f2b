"""Spectral data-free merges: TSV-M, Iso-C and Iso-CTS, with their shared linear algebra.

Scope (the same for the three methods and for ``wudi``): the matrix rule applies to every 2-D
tensor whose name does not contain ``embed``; every other tensor (biases, norms, embeddings,
convolutions) gets ``θ₀ + α · mean(τᵢ)``.

Linear algebra (exactness first, then speed):

* Matrices with at most :data:`SMALL_NUMEL` entries are decomposed in float64, larger ones in
  float32 (as the reference implementations do); results come back in the input dtype.
* The per-task decompositions use the exact thin SVD (LAPACK / cuSOLVER), truncated to the
  top ``k`` triplets. A randomised range finder was measured and rejected: TSV and Iso-CTS
  weigh every kept singular *vector* equally once the factors are orthogonalised (TSV's V̂ is
  nearly square, since T·⌊r/T⌋ ≈ r; Iso-CTS flattens the spectrum), so each vector must be
  accurate, not just the rank-k term. With k = r/3 (or r/15 for Iso-CTS) and decaying
  spectra, subspace iteration with 2–4 power steps reaches a 1e-4 residual on the rank-k term
  but only 1e-2–1e-1 per-vector residuals near the cut, which moved a TSV merge by 15%
  (``benchmarks/results/spectral-minilm.md``), and it is no faster than exact once it must
  fall back.
* :func:`polar` computes the nearest orthonormal-column matrix (the polar factor ``P Qᵀ`` of
  ``X = P Σ Qᵀ``) as ``X (XᵀX)^{-1/2}`` from a float64 eigendecomposition of the small Gram
  matrix when ``X`` is clearly tall (at most 0.75 columns per row) and ``XᵀX`` is well
  conditioned (λ_min/λ_max ≥ 1e-4 in float32, so the orthogonality error stays
  ≲ ε·√(λ_max/λ_min) ≈ 1e-5), and from an exact SVD otherwise.
* Degenerate inputs are made deterministic: singular triplets whose singular value is
  numerically zero (below ``max(m, n) · ε · σ₁``, numpy's rank tolerance) are dropped, and the
  polar factor of a rank-deficient matrix (singular values below ``2 √max(m, p) · ε · σ₁``,
  i.e. repeated or zero columns) is the partial isometry on its range. The reference
  code would instead keep LAPACK's arbitrary basis for those null directions (weighted by σ̄
  in Iso-C/Iso-CTS); wherever the reference is well defined the results agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from taskvec.errors import ConfigError
from taskvec.methods.registry import merge_method

SMALL_NUMEL = 1 << 16
"""Matrices with at most this many entries are decomposed in float64."""
POLAR_COND = {torch.float32: 1e-4, torch.float64: 1e-12}
"""Smallest λ_min/λ_max of XᵀX for which :func:`polar` uses the Gram eigendecomposition."""
POLAR_GRAM_MAX_ASPECT = 0.75
"""Nearly square factors (p > 0.75·m columns) go straight to the SVD: TSV's short-side factor
has T·⌊r/T⌋ ≈ r columns, so its Gram matrix is almost always too ill-conditioned anyway."""


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by wudi)
# --------------------------------------------------------------------------------------------


def is_matrix(tensors: torch.Tensor, name: str | None) -> bool:
    """Whether a stacked ``(N, *shape)`` parameter takes the matrix rule: 2-D and not an
    embedding (by name; without a name every 2-D tensor does)."""
    return tensors.dim() == 3 and (name is None or "embed" not in name)


def mean_rule(tensors: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """θ₀ + α · mean(τᵢ), the rule for tensors outside the matrix scope."""
    return base + alpha * (tensors - base).mean(0)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs and small matrices, float32 otherwise."""
    if x.dtype == torch.float64 or x[0].numel() <= SMALL_NUMEL:
        return torch.float64
    return torch.float32


def task_vectors(tensors: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """All τᵢ = θᵢ − θ₀, stacked, in the working dtype."""
    dt = work_dtype(tensors)
    return tensors.to(dt) - base.to(dt)


class Tasks:
    """The task vectors τᵢ = θᵢ − θ₀ of one parameter, in the working dtype, made one at a
    time on demand so that a method holds at most one of them besides its own results."""

    def __init__(self, tensors: torch.Tensor, base: torch.Tensor) -> None:
        self.tensors = tensors
        self.dtype = work_dtype(tensors)
        self.base = base.to(self.dtype)
        self.t = tensors.shape[0]
        self.shape: tuple[int, int] = (tensors.shape[1], tensors.shape[2])

    def __call__(self, i: int) -> torch.Tensor:
        return self.tensors[i].to(self.dtype) - self.base

    def total_and_norms(self) -> tuple[torch.Tensor, list[float]]:
        """Σᵢ τᵢ and the Frobenius norms ‖τᵢ‖_F."""
        total = self(0)
        norms = [float(torch.linalg.matrix_norm(total))]
        for i in range(1, self.t):
            tau = self(i)
            norms.append(float(torch.linalg.matrix_norm(tau)))
            total += tau
            del tau
        return total, norms


def _tol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    return max(shape) * torch.finfo(dtype).eps


def _keep(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, cut: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keep = s > cut
    if bool(keep.all()):
        return u, s, v
    return u[:, keep], s[keep], v[:, keep]


def exact_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(s) Vᵀ`` (V returned with singular vectors as columns)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh.mT


def polar(x: torch.Tensor) -> torch.Tensor:
    """The polar factor of ``x`` (m×p): the matrix with orthonormal columns nearest to it
    (``P Qᵀ`` for ``x = P Σ Qᵀ``); for rank-deficient ``x`` the partial isometry on its range."""
    m, p = x.shape
    if p == 0 or m == 0:
        return x
    if p > m:
        return polar(x.mT).mT
    if p <= POLAR_GRAM_MAX_ASPECT * m:
        x64 = x.double()
        lam, w = torch.linalg.eigh(x64.mT @ x64)
        top = float(lam[-1])
        if top <= 0:
            return torch.zeros_like(x)
        if float(lam[0]) >= POLAR_COND.get(x.dtype, 1e-4) * top:
            core = (w * lam.rsqrt()) @ w.mT
            return x @ core.to(x.dtype)
    u, s, v = exact_svd(x)
    if float(s[0]) == 0:
        return torch.zeros_like(x)
    # Only exact rank deficiency (repeated or zero columns) is cut here, at ~rounding level:
    # a nearly square factor can have genuine σ_min/σ_max near 1/m, which the reference keeps.
    cut = 2 * math.sqrt(max(m, p)) * torch.finfo(x.dtype).eps * float(s[0])
    u, s, v = _keep(u, s, v, cut)
    return u @ v.mT


def _alpha(alpha: float) -> float:
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


# --------------------------------------------------------------------------------------------
# TSV-M
# --------------------------------------------------------------------------------------------


def _top_each(
    mats: Callable[[int], torch.Tensor],
    t: int,
    shape: tuple[int, int],
    k: int,
    refs: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k triplets of each of the ``t`` matrices ``mats(i)`` (exact SVDs, one at a
    time so that only the kept columns stay in memory), numerically zero ones dropped,
    concatenated: U (m × Σkᵢ), s (Σkᵢ), V (n × Σkᵢ)."""
    m, n = shape
    k = min(k, m, n)
    us, ss, vs = [], [], []
    for i in range(t if k > 0 else 0):
        a = mats(i)
        u, s, v = exact_svd(a)
        top = float(s[0]) if refs is None else refs[i]
        u, s, v = _keep(u[:, :k], s[:k], v[:, :k], _tol((m, n), a.dtype) * top)
        us.append(u.clone())
        ss.append(s.clone())
        vs.append(v.clone())
        del a, u, s, v
    if not us:
        like = mats(0)
        return like.new_zeros(m, 0), like.new_zeros(0), like.new_zeros(n, 0)
    return torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)


def tsv_delta(tasks: Tasks) -> torch.Tensor:
    """The TSV-M merged task matrix."""
    m, n = tasks.shape
    u, s, v = _top_each(tasks, tasks.t, (m, n), min(m, n) // tasks.t)
    if s.numel() == 0:
        return tasks.base.new_zeros(m, n)
    return (polar(u) * s) @ polar(v).mT


@merge_method(
    "tsv",
    base="required",
    globals={"alpha": 1.0},
    reference="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
    "Merging, CVPR 2025 (arXiv 2412.00081)",
    wants_name=True,
)
def tsv(
    tensors: torch.Tensor, base: torch.Tensor, *, alpha: float, name: str | None = None
) -> torch.Tensor:
    """θ = θ₀ + α · polar(Û) diag(ŝ) polar(V̂)ᵀ, Û ŝ V̂ the top ⌊r/T⌋ SVD triplets of all τᵢ.

    TSV-M (Gargiulo et al., CVPR 2025). For each 2-D, non-embedding tensor with rank bound
    r = min(rows, cols): every task keeps its top k = ⌊r/T⌋ singular triplets τᵢ ≈ Uᵢ Sᵢ Vᵢᵀ;
    Û = [U₁ | … | U_T], V̂ = [V₁ | … | V_T] and ŝ = [S₁, …, S_T] are concatenated, and Û and V̂
    are replaced by their polar factors (nearest orthonormal-column matrices). Other tensors:
    θ₀ + α · mean(τᵢ). One model gives θ₀ + α τ₁. Triplets with a numerically zero singular
    value are dropped (the reference keeps arbitrary vectors there), and a rank-deficient Û
    (e.g. identical task vectors) is orthogonalised on its range, so T identical inputs give
    θ₀ + α times τ's best rank-⌊r/T⌋ approximation. The official code picks α on validation
    data; FusionBench uses α = 1.
    """
    alpha = _alpha(alpha)
    if not is_matrix(tensors, name):
        return mean_rule(tensors, base, alpha)
    delta = tsv_delta(Tasks(tensors, base))
    return torch.add(base, delta.to(base.dtype), alpha=alpha)


# --------------------------------------------------------------------------------------------
# Iso-C / Iso-CTS
# --------------------------------------------------------------------------------------------


def iso_c_delta(tasks: Tasks) -> torch.Tensor:
    """σ̄ · U Vᵀ for the SVD U diag(σ) Vᵀ of Σᵢ τᵢ."""
    total, _ = tasks.total_and_norms()
    u, s, v = exact_svd(total)
    sigma = s.mean()
    if float(s[0]) == 0.0:
        return torch.zeros_like(total)
    u, s, v = _keep(u, s, v, _tol(tuple(total.shape), total.dtype) * float(s[0]))
    del total
    return (u @ v.mT).mul_(sigma)


def iso_cts_split(r: int, t: int, fraction: float) -> tuple[int, int]:
    """(common rank k_c, task-specific rank per task) as the reference computes them: k_c =
    ⌊f·r⌋ adjusted so that r − k_c = T · round((r − ⌊f·r⌋)/T) (Python rounding), capped at r."""
    common = int(r * fraction)
    per_task = round((r - common) / t)
    if per_task * t > r:
        per_task = r // t
    return r - per_task * t, per_task


def _remove(tau: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """τ − U Uᵀ τ."""
    return tau - u @ (u.mT @ tau)


def iso_cts_delta(tasks: Tasks, fraction: float) -> torch.Tensor:
    """Common subspace of Σᵢ τᵢ plus task-specific subspaces, orthogonalised, flat spectrum."""
    t, (m, n) = tasks.t, tasks.shape
    r = min(m, n)
    common, per_task = iso_cts_split(r, t, fraction)
    total, refs = tasks.total_and_norms()
    u, s, v = exact_svd(total)
    if float(s[0]) > 0:
        u, s, v = _keep(
            u[:, :common], s[:common], v[:, :common], _tol((m, n), u.dtype) * float(s[0])
        )
    else:
        u, s, v = u[:, :0], s[:0], v[:, :0]
    u, s, v = u.clone(), s.clone(), v.clone()  # release the full SVD and the sum
    del total
    ut, st, vt = _top_each(lambda i: _remove(tasks(i), u), t, (m, n), per_task, refs)
    us, ss, vs = [u, ut], [s, st], [v, vt]
    s_all = torch.cat(ss)
    if s_all.numel() == 0:
        return u.new_zeros(m, n)
    sigma = s_all.sum() / r  # the mean over the r slots (dropped null directions count as 0)
    return (polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).mT).mul_(sigma)


_ISO_REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, ICML 2025 (arXiv 2502.04959)"
)


@merge_method(
    "iso_c", base="required", globals={"alpha": 1.0}, reference=_ISO_REFERENCE, wants_name=True
)
def iso_c(
    tensors: torch.Tensor, base: torch.Tensor, *, alpha: float, name: str | None = None
) -> torch.Tensor:
    """θ = θ₀ + α · σ̄ U Vᵀ, where U diag(σ) Vᵀ is the SVD of Σᵢ τᵢ and σ̄ = mean(σ).

    Iso-C (Marczak et al., ICML 2025): the spectrum of the task-arithmetic sum is flattened to
    its mean singular value (over all r = min(rows, cols) of them), for each 2-D,
    non-embedding tensor. Other tensors: θ₀ + α · mean(τᵢ). Directions whose singular value
    is numerically zero are left out (the reference adds arbitrary ones with weight σ̄), so
    rows and columns that no model changed stay at θ₀. The official code picks α on
    validation data; the FusionBench docs use α = 1.5.
    """
    alpha = _alpha(alpha)
    if not is_matrix(tensors, name):
        return mean_rule(tensors, base, alpha)
    delta = iso_c_delta(Tasks(tensors, base))
    return torch.add(base, delta.to(base.dtype), alpha=alpha)


@merge_method(
    "iso_cts",
    base="required",
    globals={"alpha": 1.0, "common_space_fraction": 0.8},
    reference=_ISO_REFERENCE,
    wants_name=True,
)
def iso_cts(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    alpha: float,
    common_space_fraction: float,
    name: str | None = None,
) -> torch.Tensor:
    """θ = θ₀ + α · σ̄ polar([U_c | U₁' | … | U_T']) polar([V_c | V₁' | … | V_T'])ᵀ.

    Iso-CTS (Marczak et al., ICML 2025), for each 2-D, non-embedding tensor with r =
    min(rows, cols): the common subspace is the top k_c singular triplets (U_c, S_c, V_c) of
    Σᵢ τᵢ, with k_c = ⌊f·r⌋ (f = `common_space_fraction`) adjusted so that r − k_c = T·s
    (s = round((r − ⌊f·r⌋)/T)); each task then contributes the top s triplets (Uᵢ', Sᵢ', Vᵢ')
    of τᵢ − U_c U_cᵀ τᵢ. The concatenated U and V are replaced by their polar factors and every
    singular value by σ̄ = (ΣS_c + Σᵢ ΣSᵢ')/r. Other tensors: θ₀ + α · mean(τᵢ). Numerically
    zero triplets are dropped (they count as 0 in σ̄). The official code picks α on
    validation data; the FusionBench docs use α = 1.5.
    """
    alpha = _alpha(alpha)
    f = float(common_space_fraction)
    if not 0.0 <= f <= 1.0:
        raise ConfigError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
    if not is_matrix(tensors, name):
        return mean_rule(tensors, base, alpha)
    delta = iso_cts_delta(Tasks(tensors, base), f)
    return torch.add(base, delta.to(base.dtype), alpha=alpha)
