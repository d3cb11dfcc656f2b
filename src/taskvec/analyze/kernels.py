"""Compiled loops (numba) for the analysis's per-block sums: one read of each row per pair.

Torch evaluates each statistic as its own full-size temporary (|τ|, the changed indicator, its
float copy, a float64 copy for the Gram matrix, ...), so the first pass cost ~10× a read of the
inputs. These loops read the block once per pair of rows and keep every sum in registers:

* :func:`pair_sums`: G_ab = Σ_i τ_a,i τ_b,i (float32 products are exact in float64, summed in
  float64), and for task pairs the entries both change (|τ| > tol) and, of those, the ones with
  opposite signs (TIES's sign conflicts, Yadav et al. 2023);
* :func:`upper_histogram`: the counts of :func:`taskvec.analyze.masks.upper_counts`;
* :func:`joint_counts`: the pairwise intersections of the top-k masks of
  :class:`taskvec.analyze.masks.MaskCounter`.

Counts are exact; the Gram sums differ from a float64 matrix product only by the order of the
additions.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot(x: np.ndarray, a: int, b: int) -> float:
    s = 0.0
    for i in range(x.shape[1]):
        s += np.float64(x[a, i]) * np.float64(x[b, i])
    return s


@numba.njit(nogil=True, cache=True)
def _conflicts(x: np.ndarray, a: int, b: int, tol: float) -> tuple[int, int]:
    both, differ = 0, 0
    for i in range(x.shape[1]):
        u, v = x[a, i], x[b, i]
        c = (abs(u) > tol) & (abs(v) > tol)  # no branches: zeros are common and unpredictable
        both += c
        differ += c & ((u < 0) != (v < 0))
    return both, differ


@numba.njit(nogil=True, cache=True)
def _extremes(x: np.ndarray, a: int, tol: float) -> tuple[float, int]:
    top, changed = 0.0, 0
    for i in range(x.shape[1]):
        m = abs(x[a, i])
        top = max(top, m)
        changed += m > tol
    return top, changed


@numba.njit(nogil=True, cache=True)
def pair_sums(
    x: np.ndarray, tasks: int, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For x (V, n) float32: the Gram matrix (V, V) float64, per row max |x| and the count of
    entries |x| ≤ tol, and over the first ``tasks`` rows the (T, T) int64 counts of entries both
    changed and of those with opposite signs."""
    v = x.shape[0]
    gram = np.zeros((v, v), dtype=np.float64)
    max_abs = np.zeros(v, dtype=np.float64)
    near_zero = np.zeros(v, dtype=np.int64)
    for a in range(v):
        top, changed = _extremes(x, a, tol)
        max_abs[a], near_zero[a] = top, x.shape[1] - changed
    both = np.zeros((tasks, tasks), dtype=np.int64)
    differ = np.zeros((tasks, tasks), dtype=np.int64)
    for a in range(v):
        for b in range(a, v):
            gram[a, b] = gram[b, a] = _dot(x, a, b)
    for a in range(tasks):
        for b in range(a, tasks):
            both[a, b], differ[a, b] = _conflicts(x, a, b, tol)
            both[b, a], differ[b, a] = both[a, b], differ[a, b]
    return gram, max_abs, near_zero, both, differ


@numba.njit(nogil=True, cache=True)
def _both_at_least(bits: np.ndarray, a: int, b: int, lo_a: int, lo_b: int) -> int:
    n = 0
    for i in range(bits.shape[1]):
        n += (bits[a, i] >= lo_a) & (bits[b, i] >= lo_b)
    return n


@numba.njit(nogil=True, cache=True)
def joint_counts(bits: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """(T, T) int64: the entries i with bits[a, i] ≥ lo[a] and bits[b, i] ≥ lo[b] (the pairs'
    top-k mask intersections, where no entry is undecided)."""
    t = bits.shape[0]
    out = np.zeros((t, t), dtype=np.int64)
    for a in range(t):
        for b in range(a, t):
            out[a, b] = out[b, a] = _both_at_least(bits, a, b, lo[a], lo[b])
    return out


@numba.njit(nogil=True, cache=True)
def upper_histogram(bits: np.ndarray, bins: int) -> np.ndarray:
    """(V, 2·bins) int64: row a's entries counted by key 2·(bits >> 16) + (lower 16 bits ≠ 0);
    key 0 (the zeros) left at 0."""
    out = np.zeros((bits.shape[0], 2 * bins), dtype=np.int64)
    for a in range(bits.shape[0]):
        row, src = out[a], bits[a]  # 1-d views: plain strided loops
        for i in range(src.shape[0]):
            w = src[i]
            row[(w >> 15) | (1 if (w & 0xFFFF) != 0 else 0)] += 1
        row[0] = 0
    return out
