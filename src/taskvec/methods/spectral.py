"""Spectral data-free merges: TSV-M, Iso-C and Iso-CTS, with their shared linear algebra.

Scope (the same for the three methods and for ``wudi``): the matrix rule applies to every 2-D
tensor whose name does not contain ``embed``; every other tensor (biases, norms, embeddings,
convolutions) gets ``θ₀ + α · mean(τᵢ)``.

Linear algebra (exactness first, then speed):

* Matrices with at most :data:`SMALL_NUMEL` entries are decomposed in float64 by exact SVDs.
  Larger ones are float32 (as in the reference implementations), and every decomposition of
  them goes through the **float64 eigendecomposition of the Gram matrix on the short side**
  (``a aᵀ`` or ``aᵀ a``, accumulated in float64 by row blocks): the top singular triplets are
  ``s = √λ``, the eigenvectors, and the other side ``a v / s`` (float64). This is exact, not an
  approximation: the Gram's eigenvalues carry an absolute error ≈ n·ε₆₄·σ₁², so every kept
  triplet (σ > max(m, n)·ε₃₂·σ₁ ≈ 1e-4·σ₁, the float32 rank cut) is at least as accurate as
  the float32 SVD's (on the 1.1B benchmark tensors TSV's error against float64 SVDs drops from
  1.9e-5 to 1.1e-6), and it costs one Gram product and one eigendecomposition instead of a
  bidiagonal SVD (as fast for square matrices, ≈ 1.5× faster for 5632×2048 on one CPU core;
  ``benchmarks/results/spectral-1b.md``). A randomised range finder was measured and
  rejected: TSV and Iso-CTS weigh every kept singular *vector* equally once the factors are
  orthogonalised, and near the cut-off its vectors moved a TSV merge by 15%
  (``benchmarks/results/spectral-minilm.md``).
* :func:`polar` computes the nearest orthonormal-column matrix (``P Qᵀ`` of ``x = P Σ Qᵀ``)
  as ``x (xᵀx)^{-1/2}`` from the same float64 Gram eigendecomposition (float32 matrices; the
  product with ``(xᵀx)^{-1/2}`` is taken in float64 when λ_min/λ_max < 1e-4, where float32
  would lose orthogonality) and by SVD for float64 ones. :func:`polar_extend` handles
  ``[A | B]`` with orthonormal ``A`` (Iso-CTS's common subspace) through a small
  2·cols(B)-sized eigenproblem, since ``[A | B]ᵀ[A | B] − I`` has rank ≤ 2·cols(B).
* Degenerate inputs are made deterministic: singular triplets whose singular value is
  numerically zero (below ``max(m, n) · ε · σ₁``, numpy's rank tolerance) are dropped, and the
  polar factor of a rank-deficient matrix (singular values below ``2 √max(m, p) · ε · σ₁``,
  i.e. repeated or zero columns) is the partial isometry on its range. The reference
  code would instead keep LAPACK's arbitrary basis for those null directions (weighted by σ̄
  in Iso-C/Iso-CTS); wherever the reference is well defined the results agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from taskvec import blas
from taskvec.errors import ConfigError
from taskvec.methods.params import Param
from taskvec.methods.registry import merge_method

SMALL_NUMEL = 1 << 16
"""Matrices with at most this many entries are decomposed in float64."""
POLAR_F32_APPLY = 1e-4
"""Smallest λ_min/λ_max of xᵀx for which :func:`polar` applies (xᵀx)^{-1/2} in float32 (the
orthogonality error is then ≲ ε₃₂·√(λ_max/λ_min) ≈ 1e-5); below it, in float64."""
BLOCK_ELEMENTS = 1 << 22
"""Rows are converted to float64 in blocks of about this many entries (32 MiB)."""


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

    def __call__(self, i: int, rows: slice = slice(None)) -> torch.Tensor:
        return self.tensors[i, rows].to(self.dtype) - self.base[rows]

    def norms(self) -> list[float]:
        """The Frobenius norms ‖τᵢ‖_F."""
        return [float(torch.linalg.vector_norm(self(i))) for i in range(self.t)]

    def total(self, rows: slice = slice(None)) -> torch.Tensor:
        """Σᵢ τᵢ on ``rows``."""
        return self._sum(rows, None)

    def total_and_norms(self) -> tuple[torch.Tensor, list[float]]:
        """Σᵢ τᵢ and the Frobenius norms ‖τᵢ‖_F, in one pass over the tasks."""
        norms: list[float] = []
        return self._sum(slice(None), norms), norms

    def _sum(self, rows: slice, norms: list[float] | None) -> torch.Tensor:
        total: torch.Tensor | None = None
        for i in range(self.t):
            tau = self(i, rows)
            if norms is not None:
                norms.append(float(torch.linalg.vector_norm(tau)))
            total = tau if total is None else total.add_(tau)
        assert total is not None
        return total


def _tol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    return max(shape) * torch.finfo(dtype).eps


def _row_blocks(*mats: torch.Tensor) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """The same rows of each matrix, as float64 blocks of about BLOCK_ELEMENTS entries."""
    step = max(1, BLOCK_ELEMENTS // max(max(x.shape[1] for x in mats), 1))
    for r in range(0, mats[0].shape[0], step):
        rows = slice(r, r + step)
        yield rows, [x[rows].double() for x in mats]


def cross64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ b in float64, accumulated over row blocks (bounded extra memory)."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for _, blocks in _row_blocks(a) if b is a else _row_blocks(a, b):
        blas.addmm_(out, blocks[0].mT, blocks[-1])
    return out


def matmul64(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b computed in float64 (``b`` float64) by row blocks of ``a``, returned in ``dtype``."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    for rows, (blk,) in _row_blocks(a):
        out[rows] = blas.mm(blk, b)
    return out


def exact_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(s) Vᵀ`` (V returned with singular vectors as columns)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh.mT


def left_spectrum(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All m left singular vectors and values of ``a`` (m ≤ n), descending, in float64 for
    float32 ``a`` (from the eigendecomposition of a aᵀ; V is then not formed: None) and by
    exact SVD (V included) for float64 ``a``."""
    if a.dtype == torch.float64:
        return exact_svd(a)
    lam, w = blas.eigh(cross64(a.mT, a.mT))
    return w.flip(1), lam.flip(0).clamp_min_(0).sqrt_(), None


def top_triplets(
    a: torch.Tensor, k: int, ref: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets ``U (m×k), s, V (n×k)`` of ``a``, in ``a``'s dtype, without
    the numerically zero ones (σ ≤ max(m, n)·ε·ref, ref = σ₁ by default); exact (see the
    module docstring): the other side is ``aᵀ U / s`` in float64."""
    m, n = a.shape
    if min(k, m, n) <= 0:
        return a.new_zeros(m, 0), a.new_zeros(0), a.new_zeros(n, 0)
    if m > n:
        v, s, u = top_triplets(a.mT, k, ref)
        return u, s, v
    u, s, v = left_spectrum(a)
    top = float(s[0]) if ref is None else ref
    kept = int((s[:k] > _tol((m, n), a.dtype) * top).sum())
    u, s = u[:, :kept], s[:kept]
    if v is None:
        v = matmul64(a.mT, u / s, a.dtype)
    return u.to(a.dtype), s.to(a.dtype), v[:, :kept].clone()


def _polar(
    x: torch.Tensor, tol: float, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(polar factor of x (m×p, p ≤ m), its p singular values descending), directions with
    σ ≤ tol·σ₁ left out of the factor; ``gram`` is xᵀx in float64 when already known."""
    if x.dtype == torch.float64:
        u, s, v = exact_svd(x)
        kept = int((s > tol * float(s[0])).sum()) if float(s[0]) > 0 else 0
        return u[:, :kept] @ v[:, :kept].mT, s
    lam, w = blas.eigh(cross64(x, x) if gram is None else gram)
    s = lam.flip(0).clamp_min(0).sqrt()
    keep = lam > tol**2 * float(lam[-1])
    if not bool(keep.any()):
        return torch.zeros_like(x), s
    w, lam = w[:, keep], lam[keep]
    half = w * lam.pow(-0.25)  # core = half halfᵀ = W Λ^(-1/2) Wᵀ, a symmetric product
    core = blas.mm(half, half.mT)
    if float(lam[0]) >= POLAR_F32_APPLY * float(lam[-1]):
        return blas.mm(x, core.to(x.dtype)), s
    return matmul64(x, core, x.dtype), s


def _polar_tol(shape: tuple[int, int], dtype: torch.dtype) -> float:
    # Only exact rank deficiency (repeated or zero columns) is cut here, at ~rounding level:
    # a nearly square factor can have genuine σ_min/σ_max near 1/m, which the reference keeps.
    return 2 * math.sqrt(max(shape)) * torch.finfo(dtype).eps


def polar(x: torch.Tensor) -> torch.Tensor:
    """The polar factor of ``x`` (m×p): the matrix with orthonormal columns nearest to it
    (``P Qᵀ`` for ``x = P Σ Qᵀ``); for rank-deficient ``x`` the partial isometry on its range."""
    m, p = x.shape
    if p == 0 or m == 0:
        return x
    if p > m:
        return polar(x.mT).mT
    return _polar(x, _polar_tol((m, p), x.dtype))[0]


def polar_extend(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """polar([A | B]) in B's dtype, for A (n×a) with orthonormal columns, through a (q+b)-sized
    problem. A's rounding error (ε of its dtype) is an error of that size in the eigenvalues
    below, so directions with smaller ones count as null: pass A in float64 where [A | B] may
    be nearly rank-deficient.

    With C = AᵀB = Q R (Q: a×q, q = min(a, b)) and D = BᵀB − I, [A | B]ᵀ[A | B] = I + E where
    E = [[0, C], [Cᵀ, D]] = Z S Zᵀ, Z = diag(Q, I_b), S = [[0, R], [Rᵀ, D]]. With S = Y μ Yᵀ,
    (I + E)^{-1/2} = I + Z Y diag((1 + μ)^{-1/2} − 1) Yᵀ Zᵀ (directions with 1 + μ at rounding
    level get factor 0: the partial isometry), so polar([A | B]) = [A | B] + [AQ | B] K Zᵀ with
    K = Y diag(…) Yᵀ; all in float64, by row blocks.
    """
    if b.shape[1] == 0:
        return a.to(b.dtype)
    if a.shape[1] == 0:
        return polar(b)
    na, nb = a.shape[1], b.shape[1]
    q, r = torch.linalg.qr(cross64(a, b))
    d = cross64(b, b)
    d.diagonal().sub_(1.0)
    nq = q.shape[1]
    small = torch.zeros(nq + nb, nq + nb, dtype=torch.float64, device=r.device)
    small[:nq, nq:] = r
    small[nq:, :nq] = r.mT
    small[nq:, nq:] = d
    mu, y = blas.eigh(small)
    lam = mu + 1.0
    top = max(1.0, float(lam[-1]))
    cut = _polar_tol((a.shape[0], na + nb), b.dtype) ** 2 * top
    cut += 0.0 if a.dtype == torch.float64 else 4 * math.sqrt(na) * torch.finfo(a.dtype).eps * top
    scale = torch.where(lam > cut, lam.clamp_min(cut).rsqrt(), torch.zeros_like(lam)) - 1.0
    k = blas.mm(y * scale, y.mT)
    out = torch.empty(a.shape[0], na + nb, dtype=b.dtype, device=b.device)
    for rows, (ab, bb) in _row_blocks(a, b):
        corr = blas.mm(torch.cat([blas.mm(ab, q), bb], 1), k)
        out[rows, :na] = blas.addmm_(ab, corr[:, :nq], q.mT)
        out[rows, na:] = bb.add_(corr[:, nq:])
    return out


def _alpha(alpha: float) -> float:
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


# --------------------------------------------------------------------------------------------
# TSV-M
# --------------------------------------------------------------------------------------------


def _top_each(
    mats: Callable[[int], torch.Tensor], t: int, k: int, refs: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k triplets of each of the ``t`` matrices ``mats(i)`` (one at a time, so that only
    the kept columns stay in memory), numerically zero ones dropped, concatenated:
    U (m × Σkᵢ), s (Σkᵢ), V (n × Σkᵢ)."""
    us, ss, vs = [], [], []
    for i in range(t):
        u, s, v = top_triplets(mats(i), k, None if refs is None else refs[i])
        us.append(u)
        ss.append(s)
        vs.append(v)
    return torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)


def tsv_delta(tasks: Tasks) -> torch.Tensor:
    """The TSV-M merged task matrix."""
    m, n = tasks.shape
    u, s, v = _top_each(tasks, tasks.t, min(m, n) // tasks.t)
    if s.numel() == 0:
        return tasks.base.new_zeros(m, n)
    u = polar(u).mul_(s)
    return blas.mm(u, polar(v).mT)


@merge_method(
    "tsv",
    base="required",
    globals={"alpha": Param(1.0)},
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
    """σ̄ · U Vᵀ for the SVD U diag(σ) Vᵀ of Σᵢ τᵢ: σ̄ times its polar factor."""
    total = tasks.total()
    x = total if total.shape[0] >= total.shape[1] else total.mT
    factor, s = _polar(x, _tol(tuple(x.shape), x.dtype))
    del total, x
    factor = factor if tasks.shape[0] >= tasks.shape[1] else factor.mT
    return factor.mul_(float(s.sum()) / s.numel())


def iso_cts_split(r: int, t: int, fraction: float) -> tuple[int, int]:
    """(common rank k_c, task-specific rank per task) as the reference computes them: k_c =
    ⌊f·r⌋ adjusted so that r − k_c = T · round((r − ⌊f·r⌋)/T) (Python rounding), capped at r."""
    common = int(r * fraction)
    per_task = round((r - common) / t)
    if per_task * t > r:
        per_task = r // t
    return r - per_task * t, per_task


def iso_cts_delta(tasks: Tasks, fraction: float) -> torch.Tensor:
    """Common subspace of Σᵢ τᵢ plus task-specific subspaces, orthogonalised, flat spectrum.

    Σᵢ τᵢ is decomposed on its short side. With m ≤ n that gives all m left singular vectors,
    so each τᵢ − U_c U_cᵀ τᵢ = U_⊥ (U_⊥ᵀ τᵢ) is decomposed through the small (m − k_c) × n
    matrix U_⊥ᵀ τᵢ. The common factors are orthonormal (float64 eigenvectors; U_c = Σᵢ τᵢ V_c
    / S_c in float32 when m > n), so the polar factors take :func:`polar_extend`.
    """
    t, (m, n) = tasks.t, tasks.shape
    r = min(m, n)
    common, per_task = iso_cts_split(r, t, fraction)
    total, refs = tasks.total_and_norms()
    dtype = total.dtype
    short = total if m <= n else total.mT
    x, s, y = left_spectrum(short)  # x: the short side's singular vectors (float64 if dtype is)
    kept = int((s[:common] > _tol((m, n), dtype) * float(s[0])).sum())
    xc, sc = x[:, :kept], s[:kept].to(dtype)
    if y is None:  # the long side: float64 for V_c (m ≤ n), float32 for the large U_c (m > n)
        yc = matmul64(short.mT, xc / s[:kept], torch.float64 if m <= n else dtype)
    else:
        yc = y[:, :kept].clone()
    if m <= n:
        uc, vc, rest = xc.clone(), yc, x[:, kept:].to(dtype)
        del total, short, x, y
        ut, st, vt = _top_each(lambda i: blas.mm(rest.mT, tasks(i)), t, per_task, refs)
        ut = blas.mm(rest, ut)
    else:
        uc, vc = yc, xc.clone()
        del total, short, x, y
        ut, st, vt = _top_each(
            lambda i: blas.addmm_(tau := tasks(i), uc, blas.mm(uc.mT, tau), alpha=-1),
            t,
            per_task,
            refs,
        )
    sigma = float(sc.sum() + st.sum()) / r  # the mean over the r slots (dropped ones count 0)
    if sigma == 0.0:
        return tasks.base.new_zeros(m, n)
    return blas.mm(polar_extend(uc, ut), polar_extend(vc, vt).mT).mul_(sigma)


_ISO_REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, ICML 2025 (arXiv 2502.04959)"
)


@merge_method(
    "iso_c",
    base="required",
    globals={"alpha": Param(1.0)},
    reference=_ISO_REFERENCE,
    wants_name=True,
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
    globals={"alpha": Param(1.0), "common_space_fraction": Param(0.8, "[0, 1]")},
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
