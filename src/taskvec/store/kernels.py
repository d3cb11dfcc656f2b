"""Compiled loops (numba) of the store's codecs: one pass over τ each way.

In torch, quantising a group of entries costs a dozen full-size temporaries (the float copy
of a bfloat16 τ, |x|, x/s, the rounded codes, their float copy for packing, the
reconstruction, the error...), and the statistics of a tensor (‖τ‖, its zeros) two more passes;
storing an int4 vector of a 1.1B model took 3.8× the time of reading it. :func:`quantise`
reads each entry once (bfloat16 as its bits, widened in registers) and writes its packed code;
:func:`dequantise` reads each code once and writes its value; :func:`moments` is one read.
Values are float32 with the arithmetic of :class:`taskvec.store.codecs.GroupQuant`'s
formulas: x/s is divided, not multiplied by a reciprocal, rounding is half-to-even, and q·s and
q·s + min are single float32 operations (the fast-math flags used only let sums of squares be
reordered), so codes and values are those of a numpy re-derivation (tests/test_codecs.py).
The kernels do no bounds checks: callers size every array (decoding checks stored parts).

Codes are packed least-significant bit first: code i of a group occupies bits
[b·i, b·(i+1)) of the group's little-endian bit stream; a group of G entries (G a multiple
of 8) takes G·b/8 whole bytes, as :func:`taskvec.store.codecs.pack_bits` lays them out.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

_SUMS = {"reassoc", "nsz"}  # sums may be reordered (vectorised); no other liberty


def kernel_input(t: torch.Tensor) -> np.ndarray:
    """A flat tensor as the kernels read it: bfloat16 as its uint16 bits, float32 as it is,
    other dtypes widened to float32."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.to(torch.float32).numpy()


def _widen(v):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled by its overload
    raise NotImplementedError


@overload(_widen)
def _widen_impl(v):  # type: ignore[no-untyped-def]
    """One entry as float32: a uint16 holds bfloat16 bits (the upper half of a float32)."""
    if isinstance(v, types.Integer):
        return lambda v: np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    return lambda v: np.float32(v)


@numba.njit(nogil=True, cache=True, fastmath=_SUMS)
def moments(x: np.ndarray) -> tuple[float, int]:
    """Σx² (float64) and the count of non-zero entries of ``x`` (see :func:`kernel_input`)."""
    total = 0.0
    nonzero = 0
    for i in range(x.shape[0]):
        v = _widen(x[i])
        total += np.float64(v) * np.float64(v)
        nonzero += v != 0
    return total, nonzero


_LANES = 8  # independent running maxima: one chain of max() per group was the bottleneck


@numba.njit(nogil=True, cache=True, inline="always")
def _extreme(buf: np.ndarray, lanes: np.ndarray, absolute: bool, negate: bool) -> np.float32:
    """max |buf| (``absolute``), max(−buf) (``negate``) or max buf, for len(buf) a multiple
    of :data:`_LANES`."""
    lanes[:] = -np.inf
    for i in range(0, buf.shape[0], _LANES):
        for j in range(_LANES):
            v = buf[i + j]
            v = abs(v) if absolute else (-v if negate else v)
            lanes[j] = max(lanes[j], v)
    top = lanes[0]
    for j in range(1, _LANES):
        top = max(top, lanes[j])
    return top


@numba.njit(nogil=True, cache=True, fastmath=_SUMS)
def quantise(
    x: np.ndarray,
    group: int,
    bits: int,
    symmetric: bool,
    packed: np.ndarray,
    scale: np.ndarray,
    low: np.ndarray,
) -> float:
    """Quantise the entries ``x`` (see :func:`kernel_input`) in groups of ``group`` (the last
    one padded with zeros) into ``packed`` (uint8, groups·group·bits/8), ``scale`` and
    ``low`` (float32, one per group; ``low`` is 0 for absmax). absmax: s = max|x|/(2^{b−1} − 1),
    code = round(x/s) + 2^{b−1} − 1; min–max: s = (max − min)/(2^b − 1),
    code = round((x − min)/s); s = 0 divides by 1. Returns Σ(x̂ − x)² (float64)."""
    n = x.shape[0]
    levels = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    top = np.float32(levels)
    zero, one = np.float32(0.0), np.float32(1.0)
    buf = np.zeros(group, np.float32)
    lanes = np.empty(_LANES, np.float32)
    codes = np.empty(group, np.uint8)
    per = group * bits // 8  # bytes per group
    err = 0.0
    for g in range(scale.shape[0]):
        a = g * group
        m = min(group, n - a)
        for i in range(m):
            buf[i] = _widen(x[a + i])
        buf[m:] = zero
        if symmetric:
            lo = zero
            hi = _extreme(buf, lanes, True, False)
        else:
            lo = -_extreme(buf, lanes, False, True)
            hi = _extreme(buf, lanes, False, False) - lo
        s = hi / top
        safe = s if s > zero else one
        e = 0.0
        if symmetric:
            for i in range(group):
                v = buf[i]
                q = min(max(np.rint(v / safe), -top), top)
                d = np.float64(q * s - v)
                e += d * d
                codes[i] = np.uint8(q + top)
        else:
            for i in range(group):
                v = buf[i]
                q = min(max(np.rint((v - lo) / safe), zero), top)
                d = np.float64(lo + q * s - v)
                e += d * d
                codes[i] = np.uint8(q)
        err += e
        at = g * per
        if bits == 8:
            for k in range(per):
                packed[at + k] = codes[k]
        elif bits == 4:
            for k in range(per):
                packed[at + k] = codes[2 * k] | (codes[2 * k + 1] << 4)
        else:  # 8 codes in every `bits` bytes
            for k in range(per // bits):
                word = np.uint32(0)
                for i in range(8):
                    word |= np.uint32(codes[8 * k + i]) << (bits * i)
                for i in range(bits):
                    packed[at + bits * k + i] = (word >> (8 * i)) & 0xFF
        scale[g] = s
        low[g] = lo
    return err


@numba.njit(nogil=True, cache=True)
def dequantise(
    packed: np.ndarray,
    scale: np.ndarray,
    low: np.ndarray,
    group: int,
    bits: int,
    symmetric: bool,
    out: np.ndarray,
) -> None:
    """The inverse of :func:`quantise` for whole groups: ``out`` (float32, groups·group)
    gets (code − 2^{b−1} + 1)·s + min (min = 0 for absmax; min–max has no offset)."""
    top = np.float32((1 << (bits - 1)) - 1) if symmetric else np.float32(0.0)
    mask = np.uint32((1 << bits) - 1)
    codes = np.empty(group, np.uint8)
    per = group * bits // 8  # bytes per group
    for g in range(scale.shape[0]):
        at = g * per
        if bits == 8:
            for k in range(per):
                codes[k] = packed[at + k]
        elif bits == 4:
            for k in range(per):
                byte = packed[at + k]
                codes[2 * k] = byte & 15
                codes[2 * k + 1] = byte >> 4
        else:  # 8 codes in every `bits` bytes
            for k in range(per // bits):
                word = np.uint32(0)
                for i in range(bits):
                    word |= np.uint32(packed[at + bits * k + i]) << (8 * i)
                for i in range(8):
                    codes[8 * k + i] = (word >> (bits * i)) & mask
        s, lo, base = scale[g], low[g], g * group
        for j in range(group):  # apart from the unpacking, so that it vectorises
            out[base + j] = (np.float32(codes[j]) - top) * s + lo
