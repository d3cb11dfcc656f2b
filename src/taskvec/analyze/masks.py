"""Exact global top-k% magnitude masks of task vectors, and their pairwise overlap, streamed.

The top-k mask of τ (N entries) is M = {i : |τ_i| ≥ t, τ_i ≠ 0}, t the m-th largest |τ_i|,
m = ⌈k·N⌉: ties with t are kept, zeros never are (the "trim" step of TIES, Yadav et al. 2023).
Two masks are compared by their Jaccard index |M_a ∩ M_b| / |M_a ∪ M_b|.

t is found exactly, with bounded memory, by a radix select on the bits of |τ| as float32 (for
non-negative floats the order of the values is the order of their bit patterns as integers),
over the two streamed passes of :mod:`taskvec.analyze.stream`:

1. the first pass counts each vector's non-zero entries by the upper 16 bits of |τ| (sign,
   exponent, 7 mantissa bits), and whether their lower 16 bits are zero (:func:`upper_counts`).
   That fixes the bin K holding t, and how many entries lie above it
   (:func:`coarse_thresholds`);
2. the second pass sorts every entry into *in* (upper bits > K), *out* (< K) or *undecided*
   (= K, a bin 2⁻⁷ wide), and counts (:class:`MaskCounter`): the undecided entries of each vector
   by their lower 16 bits, which fixes t; per pair (a, b) the entries in both (a compiled loop,
   :mod:`taskvec.analyze.kernels`); the lower bits of a's undecided entries where b is in (and
   vice versa); and the entries undecided in both, as distinct (lower bits of a, lower bits of
   b) keys with counts. That last set is small for continuous values; for quantized ones it has
   few distinct keys, and it is compacted as it grows. When fewer of bin K's entries than are
   needed have non-zero lower bits (the first pass counts them too), t is the bin's floor and
   the whole bin is in: nothing is undecided. That is the usual case for τ of bf16 models, whose
   differences mostly fit in the upper 16 bits, and it makes their second pass cheap.

So the thresholds, mask sizes and intersections are exact: no sampling, no sketch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from taskvec.analyze.kernels import joint_counts, upper_histogram

UPPER_BINS = 1 << 15  # the upper 16 bits of a non-negative float32 (its sign bit is 0)
LOWER_BINS = 1 << 16


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of |x| (float32) as int32, ordered as the magnitudes are."""
    return x.float().abs().view(torch.int32)


def upper_counts(bits: torch.Tensor) -> torch.Tensor:
    """(V, UPPER_BINS, 2) int64: each row's non-zero entries counted by their upper 16 bits,
    [..., 1] those whose lower 16 bits are not all zero, [..., 0] the others."""
    # key 2 × upper bits + (lower ≠ 0); key 0 is exactly the zeros, never in a mask
    out = torch.from_numpy(upper_histogram(bits.contiguous().numpy(), UPPER_BINS))
    return out.reshape(bits.shape[0], UPPER_BINS, 2)


def mask_size(fraction: float, n: int) -> int:
    """m = ⌈k·N⌉, computed exactly for a decimal k such as 0.05."""
    return math.ceil(Fraction(str(fraction)) * n)


@dataclass(frozen=True)
class Coarse:
    """One level k after the first pass, per vector: the upper-bits bin K of t (−1: every
    non-zero entry is in the mask), the entries above bin K, how many of bin K to take, and
    whether t is the bin's floor (K followed by 16 zero bits: fewer entries of the bin than
    that have non-zero lower bits, so the rest tie at the floor and the whole bin is in)."""

    fraction: float
    upper: list[int]
    above: list[int]
    need: list[int]
    floor: list[bool]
    bin_size: list[int]


def coarse_thresholds(counts: torch.Tensor, n: int, fraction: float) -> Coarse:
    """Locate t's upper-bits bin for each vector from its :func:`upper_counts` over N = n."""
    m = mask_size(fraction, n)
    c = Coarse(fraction, [], [], [], [], [])
    for split in counts:
        row = split.sum(1)
        if int(row.sum()) < m:  # fewer non-zeros than m: t = 0, the mask is every non-zero
            k, above, size = -1, int(row.sum()), 0
        else:
            from_top = row.flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, m))  # first bin (from the top) reaching m
            k = UPPER_BINS - 1 - j
            above, size = int(from_top[j] - row[k]), int(row[k])
        c.upper.append(k)
        c.above.append(above)
        c.need.append(m - above if k >= 0 else 0)
        c.bin_size.append(size)
        # bf16 weights give τ whose lower bits are mostly zero: then nothing is undecided
        c.floor.append(k >= 0 and m - above > int(split[k, 1]))
    return c


@dataclass(frozen=True)
class ChunkCounts:
    """What :meth:`MaskCounter.count` found in one chunk."""

    lower: dict[int, torch.Tensor]  # a: a's undecided entries by lower bits (LOWER_BINS)
    both_in: torch.Tensor  # (T, T): entries in both masks
    cross: dict[tuple[int, int], torch.Tensor]  # (a, b): the same, of those where b is in
    pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]  # (a < b): see _Pairs


class _Pairs:
    """The entries undecided in two vectors, as distinct keys (low_a << 16 | low_b) with
    counts, compacted as they come: bounded by the distinct pairs, whatever the entries."""

    COMPACT_AT = 1 << 22

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.size = 0

    def add(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        self.keys.append(keys)
        self.counts.append(counts)
        self.size += keys.numel()
        if self.size > self.COMPACT_AT:
            self.compact()

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, inverse = torch.cat(self.keys or [torch.zeros(0, dtype=torch.int64)]).unique(
            return_inverse=True
        )
        counts = torch.zeros(keys.numel(), dtype=torch.int64)
        counts.index_add_(0, inverse, torch.cat(self.counts or [counts]))
        self.keys, self.counts, self.size = [keys], [counts], keys.numel()
        return keys, counts


class MaskCounter:
    """The second pass for one level: :meth:`count` every chunk (any thread), :meth:`add` the
    counts (one thread), then :meth:`finish`."""

    def __init__(self, coarse: Coarse) -> None:
        self.coarse = coarse
        t = len(coarse.upper)
        self._upper = torch.tensor(coarse.upper, dtype=torch.int32).unsqueeze(1)
        # inside: upper bits > cut; K − 1 when the whole bin K is in (then none is undecided)
        cut = [k - 1 if floor else k for k, floor in zip(coarse.upper, coarse.floor, strict=True)]
        # so inside ⇔ bits ≥ max((cut + 1) << 16, 1): zeros never are
        self._lo = torch.tensor([max((c + 1) << 16, 1) for c in cut], dtype=torch.int32)
        some = [k >= 0 and not f for k, f in zip(coarse.upper, coarse.floor, strict=True)]
        self._undecided = torch.tensor(some).unsqueeze(1)
        self.lower = torch.zeros(t, LOWER_BINS, dtype=torch.int64)
        self.both_in = torch.zeros(t, t, dtype=torch.int64)
        self.cross = torch.zeros(t, t, LOWER_BINS, dtype=torch.int64)
        self.undecided_pairs: dict[tuple[int, int], _Pairs] = {}

    def count(self, bits: torch.Tensor) -> ChunkCounts:
        """Classify a chunk's :func:`magnitude_bits` (T, n) and count what :meth:`finish` needs:
        the in-masks' pairwise counts in one compiled loop, the rest by histograms of the
        undecided entries' lower bits (weighted by the other vector's in-mask)."""
        bits = bits.contiguous()
        both_in = torch.from_numpy(joint_counts(bits.numpy(), self._lo.numpy()))
        if not bool(self._undecided.any()):
            return ChunkCounts({}, both_in, {}, {})
        inside = bits >= self._lo.unsqueeze(1)
        undecided = ((bits >> 16) == self._upper) & self._undecided
        for a, k in enumerate(self.coarse.upper):
            if k == 0:  # bin 0 also holds the zeros
                undecided[a] &= bits[a] != 0
        t = bits.shape[0]
        lower, cross, pairs = {}, {}, {}
        for a in range(t):
            if not self._undecided[a]:
                continue  # nothing undecided
            where = undecided[a].nonzero().squeeze(1)
            if not where.numel():
                continue
            low = (bits[:, where] & (LOWER_BINS - 1)).long()  # (T, u): every vector, there
            lower[a] = torch.bincount(low[a], minlength=LOWER_BINS)
            for b in range(t):
                if b != a:
                    weights = inside[b, where].double()
                    cross[a, b] = torch.bincount(low[a], weights, LOWER_BINS).round().long()
                if b > a:
                    both = undecided[b, where]
                    if bool(both.any()):
                        pairs[a, b] = ((low[a][both] << 16) | low[b][both]).unique(
                            return_counts=True
                        )
        return ChunkCounts(lower, both_in, cross, pairs)

    def add(self, counts: ChunkCounts) -> None:
        for a, hist in counts.lower.items():
            self.lower[a] += hist
        self.both_in += counts.both_in
        for (a, b), hist in counts.cross.items():
            self.cross[a, b] += hist
        for key, (keys, n) in counts.pairs.items():
            self.undecided_pairs.setdefault(key, _Pairs()).add(keys, n)

    def finish(self) -> MaskStats:
        """Exact thresholds, mask sizes and pairwise intersections."""
        c = self.coarse
        t = len(c.upper)
        lows, sizes, thresholds = [], [], []
        for a in range(t):
            if c.upper[a] < 0 or c.floor[a]:
                lows.append(0)
                sizes.append(c.above[a] + c.bin_size[a])
                bits = torch.tensor([max(c.upper[a], 0) << 16], dtype=torch.int32)
                thresholds.append(float(bits.view(torch.float32)))
                continue
            from_top = self.lower[a].flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, c.need[a]))
            lows.append(LOWER_BINS - 1 - j)
            sizes.append(c.above[a] + int(from_top[j]))
            bits = torch.tensor([(c.upper[a] << 16) | lows[-1]], dtype=torch.int32)
            thresholds.append(float(bits.view(torch.float32)))
        inter = [[0] * t for _ in range(t)]
        for a in range(t):
            inter[a][a] = sizes[a]
            for b in range(a + 1, t):
                n = int(self.both_in[a, b])
                n += int(self.cross[a, b, lows[a] :].sum()) + int(self.cross[b, a, lows[b] :].sum())
                if (a, b) in self.undecided_pairs:
                    keys, counts = self.undecided_pairs[a, b].compact()
                    both = ((keys >> 16) >= lows[a]) & ((keys & (LOWER_BINS - 1)) >= lows[b])
                    n += int(counts[both].sum())
                inter[a][b] = inter[b][a] = n
        return MaskStats(c.fraction, thresholds, sizes, inter)


@dataclass(frozen=True)
class MaskStats:
    """One level k: per vector the threshold t and mask size |M|, and |M_a ∩ M_b|."""

    fraction: float
    thresholds: list[float]
    sizes: list[int]
    intersections: list[list[int]]

    def jaccard(self) -> list[list[float]]:
        """|M_a ∩ M_b| / |M_a ∪ M_b| (1 on the diagonal; 0 for two empty masks)."""
        t = len(self.sizes)
        out = [[1.0] * t for _ in range(t)]
        for a in range(t):
            for b in range(t):
                if a != b:
                    union = self.sizes[a] + self.sizes[b] - self.intersections[a][b]
                    out[a][b] = self.intersections[a][b] / union if union else 0.0
        return out
