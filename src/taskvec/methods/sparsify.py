"""Sparsification of one task vector: which entries survive, and how survivors are rescaled.

All functions are pure, take a float tensor ``delta`` and return a tensor of the same shape.
Exact top-k selection uses a radix select (a 2¹⁶-bin histogram of the values' ordered upper bits,
then a k-th value inside the one boundary bin) instead of sorting the whole tensor; ties at the
threshold are broken by position, so exactly ``k`` entries are kept.
"""

from __future__ import annotations

import math

import torch

from taskvec.errors import ConfigError

_BINS = 1 << 16
RESCALE_MODES = ("l1", "expectation")


def _monotone(bits: torch.Tensor) -> torch.Tensor:
    """Map float32 bit patterns to int32 with the same order as the floats (an involution)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _keys(x: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """Order-preserving 16-bit keys of floats (the upper half of their ordered bits)."""
    bits = x.to(torch.float32).view(torch.int32)
    if not nonnegative and bool((bits < 0).any()):
        bits = _monotone(bits)
    keys = bits >> 16  # non-negative floats: the bits are already ordered
    return keys.add_(1 << 15)


def _key_floor(key: int) -> float:
    """The smallest float whose key is ``key``."""
    mono = torch.tensor([(key - (1 << 15)) << 16], dtype=torch.int32)
    return float(_monotone(mono).view(torch.float32))


def kth_largest(values: torch.Tensor, k: int, nonnegative: bool = False) -> float:
    """The k-th largest entry of a flat tensor (1 ≤ k ≤ n), by radix select: a histogram of
    16-bit keys finds the bin holding it, then ``kthvalue`` runs inside that bin only."""
    keys = _keys(values, nonnegative)
    counts = torch.bincount(keys, minlength=_BINS)
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = #entries with key >= b
    b = int(torch.nonzero(above >= k).max())
    in_bin = values[keys == b]
    need = k - (int(above[b + 1]) if b + 1 < _BINS else 0)
    return float(torch.kthvalue(in_bin, in_bin.numel() - need + 1).values)


def topk_mask(values: torch.Tensor, k: int, nonnegative: bool = False) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a flat tensor (ties broken by position)."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    thr = kth_largest(values, k, nonnegative)
    mask = values >= thr
    extra = int(mask.sum()) - k
    if extra > 0:  # entries equal to the threshold beyond the k-th: drop the last ones
        ties = torch.nonzero(values == thr).squeeze(1)
        mask[ties[ties.numel() - extra :]] = False
    return mask


def magnitude_histogram(magnitude: torch.Tensor) -> torch.Tensor:
    """Counts of values per 16-bit key (mergeable across tensors by addition)."""
    return torch.bincount(_keys(magnitude, nonnegative=True).reshape(-1), minlength=_BINS)


def histogram_threshold(counts: torch.Tensor, density: float) -> float:
    """The smallest magnitude kept when keeping the top ``density`` of the counted values:
    the lower edge of the key bin holding the k-th largest (exact to bfloat16 resolution)."""
    n = int(counts.sum())
    if density >= 1 or n == 0:
        return 0.0
    k = max(1, int(density * n))
    above = counts.flip(0).cumsum(0).flip(0)
    b = int(torch.nonzero(above >= k).max())
    return _key_floor(b)


def threshold(
    delta: torch.Tensor, thr: float, density: float, rescale: str | None = None
) -> torch.Tensor:
    """Keep the entries with |δ| ≥ thr (a whole-model top-k threshold), then rescale."""
    if density >= 1:
        return delta
    return _rescale(delta, delta * (delta.abs() >= thr), density, rescale)


def _rescale(
    delta: torch.Tensor, kept: torch.Tensor, keep_prob: torch.Tensor | float, mode: str | None
) -> torch.Tensor:
    """Rescale the survivors: ``l1`` matches the original L1 norm (mergekit),
    ``expectation`` divides by the keep probability (the DARE/DELLA papers)."""
    if mode is None:
        return kept
    if mode == "l1":
        before, after = float(delta.abs().sum()), float(kept.abs().sum())
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    if mode == "expectation":
        return kept / keep_prob
    raise ConfigError(f"rescale must be true, false, 'l1' or 'expectation', got {mode!r}")


def rescale_mode(rescale: bool | str) -> str | None:
    """mergekit's ``rescale: true`` means L1; strings name a mode explicitly."""
    if isinstance(rescale, bool):
        return "l1" if rescale else None
    return str(rescale)


Bounds = tuple[float, float]


def magnitude_bounds(delta: torch.Tensor, density: float) -> Bounds:
    """|δ| bounds ``[lo, hi)`` of the entries :func:`magnitude` keeps (ties at lo all kept)."""
    if density >= 1 or delta.numel() == 0:
        return (0.0, math.inf)
    if density <= 0:
        return (math.inf, math.inf)
    k = max(1, int(density * delta.numel()))
    return (kth_largest(delta.abs().reshape(-1), k, nonnegative=True), math.inf)


def outlier_bounds(delta: torch.Tensor, density: float, gamma: float) -> Bounds:
    """|δ| bounds ``[lo, hi)`` of the entries :func:`outliers` keeps (ties kept at lo,
    dropped at hi)."""
    if density >= 1:
        return (0.0, math.inf)
    n = delta.numel()
    keep = int(density * n)
    n_top = n - max(0, n - keep - int(gamma * n)) - keep
    a = delta.abs().reshape(-1)
    lo = kth_largest(a, n_top + keep, nonnegative=True) if n_top + keep > 0 else math.inf
    hi = kth_largest(a, n_top, nonnegative=True) if n_top > 0 else math.inf
    return (lo, hi)


def magnitude(delta: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    """Keep the ⌊density·n⌋ (at least one) largest-magnitude entries (TIES trim)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = topk_mask(delta.abs().reshape(-1), k, nonnegative=True).reshape(delta.shape)
    return _rescale(delta, delta * mask, density, rescale)


def random_drop(
    delta: torch.Tensor, density: float, rescale: str | None, generator: torch.Generator
) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return _rescale(delta, delta * keep, density, rescale)


def outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ⌊γn⌋ magnitudes and the smallest ones, keeping
    ⌊density·n⌋ entries; fewer top entries are dropped if density requires it."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    n_top = n - n_bottom - keep
    a = delta.abs().reshape(-1)
    mask = topk_mask(a, n_top + keep, nonnegative=True) & ~topk_mask(a, n_top, nonnegative=True)
    return _rescale(delta, delta * mask.reshape(delta.shape), density, rescale)


def row_rank_fraction(magnitude: torch.Tensor) -> torch.Tensor:
    """For each entry, its magnitude rank within its row mapped to [0, 1] (0 = smallest);
    ties are ranked by position, as a stable sort would."""
    rows, cols = magnitude.shape
    if cols == 1:
        return torch.zeros_like(magnitude)
    order = magnitude.argsort(dim=1, stable=True)
    ranks = torch.empty_like(magnitude)
    steps = torch.arange(cols, dtype=magnitude.dtype) / (cols - 1)
    return ranks.scatter_(1, order, steps.expand(rows, cols))


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: str | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the magnitude rank within each row,
    from density − ε (smallest) to density + ε (largest), then a Bernoulli draw."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ConfigError(
            f"della needs 0 < density - epsilon and density + epsilon < 1 "
            f"(density {density:g}, epsilon {epsilon:g})"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    prob = (density - epsilon) + 2 * epsilon * row_rank_fraction(rows.abs())
    keep = torch.rand(rows.shape, generator=generator) < prob
    kept = (rows * keep).reshape(delta.shape)
    return _rescale(delta, kept, prob.reshape(delta.shape), rescale)
