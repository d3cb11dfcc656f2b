"""Sparsification of one task vector: which entries survive, and how survivors are rescaled.

All functions are pure, take a float tensor ``delta`` and return a tensor of the same shape.
Exact top-k selection uses a radix select (a 2¹⁶-bin histogram of the values' ordered upper bits,
then a k-th value inside the one boundary bin) instead of sorting the whole tensor; ties at the
threshold are broken by position, so exactly ``k`` entries are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Window:
    """The entries of magnitude rank ``[start, stop)`` (rank 0 = largest; equal magnitudes are
    ranked by position): those with ``lo ≤ |x| ≤ hi`` except the positions in ``drop``, which
    are the entries tied with ``lo`` or ``hi`` whose rank falls outside the window."""

    lo: float
    hi: float
    drop: torch.Tensor

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        mask = (magnitude >= self.lo) & (magnitude <= self.hi)
        mask.view(-1)[self.drop] = False
        return mask


_MAGNITUDE_BINS = 1 << 15
_SCAN = 1 << 22  # entries per step of a scan: temporaries stay small whatever the tensor


def _magnitude_keys(chunk: torch.Tensor) -> torch.Tensor:
    """15-bit keys ordered like |x|: the upper bits of |x| as a float32, sign cleared."""
    bits = chunk.to(torch.float32).view(torch.int32)
    return bits.bitwise_and(0x7FFFFFFF).bitwise_right_shift_(16)


def rank_window(delta: torch.Tensor, start: int, stop: int) -> Window:
    """The :class:`Window` of magnitude ranks ``[start, stop)`` of ``delta``.

    Radix select in bounded memory: one scan builds a histogram of magnitude keys, which
    locates the bins holding ranks ``start`` and ``stop − 1``; a second scan collects those
    bins' entries (zeros excepted: which zeros are kept changes nothing), ranked exactly
    inside the bin by magnitude, then position.
    """
    flat = delta.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    nothing = torch.zeros(0, dtype=torch.long, device=flat.device)
    if start >= stop:
        return Window(math.inf, -math.inf, nothing)
    if start == 0 and stop == n:
        return Window(0.0, math.inf, nothing)
    counts = torch.zeros(_MAGNITUDE_BINS, dtype=torch.long, device=flat.device)
    for chunk in flat.split(_SCAN):
        counts += torch.bincount(_magnitude_keys(chunk), minlength=_MAGNITUDE_BINS)
    above = torch.cat([counts.flip(0).cumsum(0).flip(0), counts.new_zeros(1)])

    def bin_of(rank: int) -> int:  # the bin holding the entry of this rank (0 = largest)
        return int(torch.nonzero(above[:-1] > rank).max())

    bins = {bin_of(r) for r in (start, stop - 1)}
    positions, values = [], []
    for offset, chunk in zip(range(0, n, _SCAN), flat.split(_SCAN), strict=True):
        keys = _magnitude_keys(chunk)
        hit = keys == min(bins)
        if len(bins) == 2:
            hit |= keys == max(bins)
        hit &= chunk != 0
        where = torch.nonzero(hit).squeeze(1)
        positions.append(where + offset)
        values.append(chunk[where].abs())
    pos, val = torch.cat(positions), torch.cat(values)
    ranked = torch.sort(val, descending=True, stable=True)  # equal values keep position order
    val, pos = ranked.values, pos[ranked.indices]
    # entries in a higher bin come first; the collected bins are ranked from there on
    first = int(above[max(bins) + 1])
    ranks = torch.arange(first, first + val.numel(), device=val.device)
    if len(bins) == 2:  # the lower bin's entries rank after everything above that bin
        low = int((_magnitude_keys(val) > min(bins)).sum())
        ranks[low:] += int(above[min(bins) + 1]) - (first + low)

    def value_at(rank: int) -> float:
        at = torch.nonzero(ranks == rank)
        return float(val[at[0, 0]]) if at.numel() else 0.0  # not collected: a zero

    lo = value_at(stop - 1) if stop < n else 0.0
    hi = value_at(start) if start > 0 else math.inf
    if hi == 0.0:  # every entry of the window is zero
        return Window(math.inf, -math.inf, nothing)
    outside = (ranks < start) | (ranks >= stop)
    drop = pos[outside & (val >= lo) & (val <= hi)]
    return Window(lo, hi, drop)


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
    _check_mode(mode)
    if mode == "l1":
        return _match_l1(kept, _l1(delta))
    if mode == "expectation":
        return kept.div_(keep_prob)
    return kept


def rescale_mode(rescale: bool | str) -> str | None:
    """mergekit's ``rescale: true`` means L1; strings name a mode explicitly."""
    if isinstance(rescale, bool):
        return "l1" if rescale else None
    return str(rescale)


def _outlier_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ranks kept by Breadcrumbs: ⌊density·n⌋ entries after the ⌊γn⌋ largest, fewer of those
    skipped when density requires it."""
    keep = int(density * n)
    n_bottom = max(0, n - keep - int(gamma * n))
    return n - n_bottom - keep, n - n_bottom


def magnitude_window(delta: torch.Tensor, density: float) -> Window:
    """The :class:`Window` :func:`magnitude` keeps."""
    if density >= 1:
        return Window(0.0, math.inf, torch.zeros(0, dtype=torch.long))
    k = max(1, int(density * delta.numel())) if density > 0 else 0
    return rank_window(delta, 0, k)


def outlier_window(delta: torch.Tensor, density: float, gamma: float) -> Window:
    """The :class:`Window` :func:`outliers` keeps."""
    if density >= 1:
        return Window(0.0, math.inf, torch.zeros(0, dtype=torch.long))
    return rank_window(delta, *_outlier_ranks(delta.numel(), density, gamma))


def magnitude(delta: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    """Keep the ⌊density·n⌋ (at least one) largest-magnitude entries (TIES trim)."""
    if density >= 1:
        return delta
    kept = delta * magnitude_window(delta, density).mask(delta.abs())
    return _rescale(delta, kept, density, rescale)


def _l1(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, ord=1))


def _match_l1(kept: torch.Tensor, before: float) -> torch.Tensor:
    """Scale ``kept`` in place so its L1 norm is ``before`` (mergekit's rescale)."""
    after = _l1(kept)
    if before >= 1e-7 and after >= 1e-7:
        kept.mul_(before / after)
    return kept


def _check_mode(mode: str | None) -> None:
    if mode not in (None, *RESCALE_MODES):
        raise ConfigError(f"rescale must be true, false, 'l1' or 'expectation', got {mode!r}")


def _uniform(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) draws shaped like ``like``, drawn on the CPU (the same on every device)."""
    return torch.rand(like.shape, generator=generator).to(like.device)


def random_drop(
    delta: torch.Tensor, density: float, rescale: str | None, generator: torch.Generator
) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE).

    Works in place on ``delta`` (contiguous), drawing the uniforms in fixed-size steps so
    no temporary is as large as the tensor."""
    _check_mode(rescale)
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    before = _l1(delta) if rescale == "l1" else 0.0
    for chunk in delta.view(-1).split(_SCAN):
        chunk.mul_(_uniform(chunk, generator) < density)
    if rescale == "expectation":
        return delta.div_(density)
    return _match_l1(delta, before) if rescale == "l1" else delta


def outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ⌊γn⌋ magnitudes and the smallest ones, keeping
    ⌊density·n⌋ entries; fewer top entries are dropped if density requires it."""
    if density >= 1:
        return delta
    kept = delta * outlier_window(delta, density, gamma).mask(delta.abs())
    return _rescale(delta, kept, density, rescale)


def row_order(magnitude: torch.Tensor) -> torch.Tensor:
    """Per row, the column indices of ``magnitude`` (≥ 0) from smallest to largest, equal
    values in position order: exactly ``argsort(dim=1, stable=True)``.

    On the CPU in float32 the keys ``bits(|x|) · 2ᵇ + column`` (b bits hold a column) are
    distinct int64 values ordered like (magnitude, position), so a plain sort of the keys gives
    the stable order and their low bits are the indices: numpy's (SIMD) sort of int64 values
    is about 8× faster than torch's stable argsort, which dominated DELLA."""
    cols = magnitude.shape[1]
    shift = max(1, (cols - 1).bit_length())
    if magnitude.dtype != torch.float32:
        return magnitude.argsort(dim=1, stable=True)
    bits = magnitude.view(torch.int32)  # float32 ≥ 0 orders like its bits
    if magnitude.device.type != "cpu" or shift > 32:
        return bits.argsort(dim=1, stable=True)
    keys = torch.add(torch.arange(cols), bits.long(), alpha=1 << shift)
    keys.numpy().sort(axis=1)  # in place: the keys are ours
    return keys.bitwise_and_((1 << shift) - 1)


def row_rank_fraction(magnitude: torch.Tensor) -> torch.Tensor:
    """For each entry, its magnitude rank within its row mapped to [0, 1] (0 = smallest);
    ties are ranked by position, as a stable sort would."""
    rows, cols = magnitude.shape
    if cols == 1:
        return torch.zeros_like(magnitude)
    order = row_order(magnitude)
    ranks = torch.empty_like(magnitude)
    steps = torch.arange(cols, dtype=magnitude.dtype, device=magnitude.device) / (cols - 1)
    return ranks.scatter_(1, order, steps.expand(rows, cols))


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: str | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the magnitude rank within each row,
    from density − ε (smallest) to density + ε (largest), then a Bernoulli draw.

    Works in place on ``delta`` (contiguous), a block of rows at a time."""
    _check_mode(rescale)
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ConfigError(
            f"della needs 0 < density - epsilon and density + epsilon < 1 "
            f"(density {density:g}, epsilon {epsilon:g})"
        )
    before = _l1(delta) if rescale == "l1" else 0.0
    rows = delta.view(1, -1) if delta.dim() < 2 else delta.view(delta.shape[0], -1)
    step = max(1, _SCAN // rows.shape[1])
    for block in rows.split(step):
        prob = row_rank_fraction(block.abs()).mul_(2 * epsilon).add_(density - epsilon)
        block.mul_(_uniform(block, generator) < prob)
        if rescale == "expectation":
            block.div_(prob)
    return _match_l1(delta, before) if rescale == "l1" else delta
