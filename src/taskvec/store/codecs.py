"""Codecs for stored task vectors: how one tensor τ becomes a few named parts and back.

Every codec is a pure pair ``encode(τ) -> parts`` / ``decode(parts, shape, rows) -> τ̂``: the
parts are plain tensors stored side by side in a safetensors blob, the codec's settings (bits,
group size, rank, seed...) are its :attr:`Codec.spec` string, recorded with the tensor.
``decode`` of a row range ``[r0, r1)`` of the first axis decodes only what those rows need
(except DARE, whose mask is drawn for the whole tensor). Bits per parameter are measured from
the stored bytes (:func:`bits_per_parameter`); the store records them with the relative error
‖τ − τ̂‖ / ‖τ‖ of every tensor.

* ``exact``: τ as it is (16 or 32 bits).
* ``int{8,4,3,2}`` (TVQ, Kim et al., arXiv 2503.06921: quantise τ, not θ): the flattened τ in
  groups of ``G`` entries. absmax (symmetric): s = max|x| / (2^{b−1} − 1), q = round(x/s),
  x̂ = q·s; min–max (asymmetric): s = (max − min)/(2^b − 1), q = round((x − min)/s),
  x̂ = min + q·s. Both err by at most s/2 per entry. b bits per entry plus 32/G (absmax) or
  64/G (min–max) for the float32 scales and minima. With ``/zstd`` (the default of a bare
  ``intN``: ``int4`` is ``int4/g128/absmax/zstd``) the packed codes are then entropy-coded
  losslessly (Zstandard frames, whose literals are Huffman-coded), in independent chunks of
  ``_GROUPS_PER_CHUNK`` groups with their byte offsets, so a row range still decodes alone:
  τ's codes crowd the levels near zero (about 1.9 bits per int4 code on the benchmark's
  experts instead of 4).
* ``topk``: the ⌈d·n⌉ entries of largest |τ| with their flat int32/int64 indices; about
  d·(32 + 16) bits for a bfloat16 τ.
* ``dare`` (Yu et al., arXiv 2311.03099): keep each entry with probability 1 − p from a
  generator seeded by (seed, tensor name), rescaled by 1/(1 − p); only the kept values are
  stored (the mask is redrawn from the seed): about (1 − p)·16 bits.
* ``lowrank``: per matrix, the truncated SVD τ ≈ (U_r S_r) V_rᵀ at rank r, at the smallest
  rank keeping a fraction e of Σσ² (mergekit-extract-lora), or at ⌊min(m, n)/T⌋, one task's
  share of T (TSV-C, arXiv 2412.00081); other tensors exact. r(m + n)·16/(mn) bits for
  bfloat16 factors.
* ``sign`` (BitDelta, Liu et al., arXiv 2402.10193): per matrix, τ̂ = α·sign(τ) with
  α = mean|τ| (its scale distillation is :mod:`taskvec.store.calibrate`); 1 bit per entry
  plus one float32; other tensors exact.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import zstandard

from taskvec.engine import job_parts
from taskvec.errors import ConfigError
from taskvec.store import kernels

Parts = Mapping[str, torch.Tensor]
Shape = tuple[int, ...]
Rows = tuple[int, int] | None
_GROUPS_PER_CHUNK = 4096  # quantise (and compress, part of the /zstd format) in such pieces
_ZSTD_LEVEL = 3
MAX_PARTS = 4  # the most parts a codec stores per tensor


class StoredParts(Mapping[str, torch.Tensor]):
    """Parts read on demand from storage: ``parts[key]`` reads a whole part,
    :meth:`rows` only a slice of it (what decoding a block of rows needs)."""

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


def part_rows(parts: Parts, key: str, start: int, stop: int) -> torch.Tensor:
    """Entries ``[start, stop)`` along the first axis of the part ``key``, reading no more."""
    if isinstance(parts, StoredParts):
        return parts.rows(key, start, stop)
    return parts[key][start:stop]


# --- bit packing ----------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes (a multiple of 8 of them) packed little-endian: every 8
    codes become ``bits`` bytes (code i of a byte-aligned run at bit ``bits·i``). The words
    are formed by a float32 product with the powers of two, exact as they stay below 2²⁴."""
    if bits == 8:
        return codes.to(torch.int32).to(torch.uint8)
    per = 8 // bits if 8 % bits == 0 else 8  # codes per word: a byte, or 8 codes in b bytes
    weights = torch.tensor([float(1 << (bits * i)) for i in range(per)])
    words = (codes.to(torch.float32).reshape(-1, per) @ weights).to(torch.int32)
    if per * bits == 8:
        return words.to(torch.uint8)
    shifts = 8 * torch.arange(bits, dtype=torch.int32)
    return ((words.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: the codes as uint8, 8 per ``bits`` bytes."""
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        if per == 1:
            return packed
        fields = [(packed >> (bits * i)) & mask for i in range(per - 1)]
        return torch.stack([*fields, packed >> (bits * (per - 1))], 1).reshape(-1)
    chunks = packed.to(torch.int64).reshape(-1, bits)
    word = (chunks << (8 * torch.arange(bits))).sum(1)
    out = (word.unsqueeze(1) >> (bits * torch.arange(8))) & ((1 << bits) - 1)
    return out.to(torch.uint8).reshape(-1)


def _span(shape: tuple[int, ...], rows: Rows) -> tuple[int, int]:
    """The flat element range of rows ``[r0, r1)`` (all of it for ``None``)."""
    n = math.prod(shape)
    if rows is None:
        return 0, n
    per_row = n // shape[0] if shape and shape[0] else 0
    return rows[0] * per_row, rows[1] * per_row


def _shape_of(shape: tuple[int, ...], rows: Rows) -> tuple[int, ...]:
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def _is_matrix(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and min(shape) > 1


def row_chunks(shape: Shape) -> list[Rows]:
    """Row blocks covering a tensor, as the engine cuts elementwise work (``[None]``: the
    whole tensor, for one of fewer than 2 dims)."""
    return [rows for rows, _ in job_parts(shape, by_rows=True)]


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖², accumulated in float64."""
    return float(torch.linalg.vector_norm(a - b, dtype=torch.float64) ** 2)


# --- codecs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """One way of storing a tensor; ``spec`` names it with its settings (``int4/g128/absmax``)."""

    spec: str

    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_measured(
        self, tau: torch.Tensor, name: str
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The parts, and ‖τ − decode(parts)‖² (decoded again, a block of rows at a time)."""
        parts = self.encode(tau, name)
        shape = tuple(tau.shape)
        err2 = 0.0
        for rows in row_chunks(shape):
            ref = (tau if rows is None else tau[rows[0] : rows[1]]).float()
            err2 += squared_distance(self.decode(parts, shape, rows, name), ref)
        return parts, err2

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Exact(Codec):
    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        return {"value": tau.contiguous()}

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        v = parts["value"] if rows is None else part_rows(parts, "value", *rows)
        return v.float()


@dataclass(frozen=True)
class GroupQuant(Codec):
    """Per-group b-bit quantisation of the flattened τ (TVQ, Kim et al., arXiv 2503.06921).

    absmax: s = max|x|/(2^{b−1} − 1), x̂ = s·round(x/s); min–max: s = (max − min)/(2^b − 1),
    x̂ = min + s·round((x − min)/s). |x − x̂| ≤ s/2. b + 32/G bits per entry (absmax), or
    b + 64/G (min–max), for groups of G entries with float32 scales and minima; with
    ``entropy`` the packed codes of every piece of ``_GROUPS_PER_CHUNK`` groups are a
    Zstandard frame (parts ``zcodes`` and their offsets ``zoff``) instead of stored as they
    are (``codes``)."""

    bits: int
    group: int
    symmetric: bool
    entropy: bool = False

    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        return self.encode_measured(tau, name)[0]

    def encode_measured(
        self, tau: torch.Tensor, name: str
    ) -> tuple[dict[str, torch.Tensor], float]:
        """In pieces of ``_GROUPS_PER_CHUNK`` groups (compiled, see
        :func:`taskvec.store.kernels.quantise`); the error from each entry's reconstruction."""
        flat = kernels.kernel_input(tau)
        groups = -(-flat.size // self.group)
        codes = np.empty(groups * self.group * self.bits // 8, np.uint8)
        scale, low = np.empty(groups, np.float32), np.empty(groups, np.float32)
        step, per_group = self.group * _GROUPS_PER_CHUNK, self.group * self.bits // 8
        err2, zipped = 0.0, []
        for c, i in enumerate(range(0, flat.size, step)):
            g = slice(c * _GROUPS_PER_CHUNK, c * _GROUPS_PER_CHUNK + _GROUPS_PER_CHUNK)
            piece = codes[g.start * per_group : g.stop * per_group]
            x = flat[i : i + step]
            err2 += kernels.quantise(
                x, self.group, self.bits, self.symmetric, piece, scale[g], low[g]
            )
            if self.entropy:
                zipped.append(_compress(piece))
        parts = {"scale": torch.from_numpy(scale)}
        if not self.symmetric:
            parts["min"] = torch.from_numpy(low)
        if self.entropy:
            parts["zcodes"] = torch.cat(zipped)
            parts["zoff"] = torch.tensor([0] + [z.numel() for z in zipped]).cumsum(0)
        else:
            parts["codes"] = torch.from_numpy(codes)
        return parts, err2

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        start, stop = _span(shape, rows)
        g0, g1 = start // self.group, -(-stop // self.group)
        per_group = self.group * self.bits // 8
        if self.entropy:
            c0 = g0 // _GROUPS_PER_CHUNK
            codes = _decompress(parts, c0, -(-g1 // _GROUPS_PER_CHUNK))
            first = (g0 - c0 * _GROUPS_PER_CHUNK) * per_group
            codes = codes[first : first + (g1 - g0) * per_group]
        else:
            codes = part_rows(parts, "codes", g0 * per_group, g1 * per_group).numpy()
        scale = part_rows(parts, "scale", g0, g1).float().numpy()
        if self.symmetric:
            low = np.zeros_like(scale)
        else:
            low = part_rows(parts, "min", g0, g1).float().numpy()
        if codes.size != (g1 - g0) * per_group or scale.size != g1 - g0 or low.size != g1 - g0:
            raise ValueError("its stored parts are shorter than its shape needs")  # no overrun
        out = np.empty((g1 - g0) * self.group, np.float32)
        kernels.dequantise(codes, scale, low, self.group, self.bits, self.symmetric, out)
        offset = start - g0 * self.group
        x = torch.from_numpy(out)[offset : offset + stop - start]
        return x.reshape(_shape_of(shape, rows))


def _compress(packed: np.ndarray) -> torch.Tensor:
    """Packed codes as one Zstandard frame (level 3: as compact as a Huffman code of the
    bytes on τ codes, and decoded at over 1 GB/s)."""
    data = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(packed)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decompress(parts: Parts, c0: int, c1: int) -> np.ndarray:
    """The packed codes of the compressed chunks ``[c0, c1)``, reading only their bytes."""
    off = [int(o) for o in part_rows(parts, "zoff", c0, c1 + 1)]
    data = part_rows(parts, "zcodes", off[0], off[-1]).numpy()
    unzip = zstandard.ZstdDecompressor()
    chunks = [
        np.frombuffer(unzip.decompress(data[a - off[0] : b - off[0]]), np.uint8)
        for a, b in pairwise(off)
    ]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


@dataclass(frozen=True)
class TopK(Codec):
    """The ⌈d·n⌉ entries of largest |τ| (d = ``density``), exact, with their flat int32
    indices: d·(32 + the dtype's bits) bits per entry."""

    density: float

    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        flat = tau.reshape(-1)
        k = min(flat.numel(), math.ceil(self.density * flat.numel()))
        index = torch.topk(flat.float().abs(), k, sorted=False).indices.sort().values
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return {"index": index.to(index_dtype), "value": flat[index].contiguous()}

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        start, stop = _span(shape, rows)
        index = parts["index"].to(torch.int64)
        lo, hi = (int(i) for i in torch.searchsorted(index, torch.tensor([start, stop])))
        out = torch.zeros(stop - start)
        out[index[lo:hi] - start] = part_rows(parts, "value", lo, hi).float()
        return out.reshape(_shape_of(shape, rows))


def _dare_mask(name: str, seed: int, numel: int, keep: float) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.rand(numel, generator=g) < keep


@dataclass(frozen=True)
class Dare(Codec):
    """DARE (Yu et al., arXiv 2311.03099): keep each entry with probability 1 − p, rescaled
    by 1/(1 − p); the mask is redrawn from ``seed`` and the tensor name, so only the kept
    values are stored: about (1 − p)·(the dtype's bits) bits per entry."""

    p: float
    seed: int

    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        flat = tau.reshape(-1)
        mask = _dare_mask(name, self.seed, flat.numel(), 1.0 - self.p)
        kept = (flat[mask].float() / (1.0 - self.p)).to(tau.dtype)
        return {"value": kept, "check": torch.tensor([int(mask.sum())], dtype=torch.int64)}

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        mask = _dare_mask(name, self.seed, math.prod(shape), 1.0 - self.p)
        if int(mask.sum()) != int(parts["check"][0]):
            raise ValueError("the DARE mask redrawn from the seed differs from the stored one")
        out = torch.zeros(mask.numel())
        out[mask] = parts["value"].float()
        start, stop = _span(shape, rows)
        return out[start:stop].reshape(_shape_of(shape, rows))


@dataclass(frozen=True)
class LowRank(Codec):
    """τ ≈ (U_r S_r) V_rᵀ per matrix, at rank r = ``rank``, the smallest r keeping a
    fraction ``energy`` of Σσ² (mergekit-extract-lora), or r = ⌊min(m, n)/T⌋ for
    ``share`` = T, each of T tasks keeping its share of the full rank as TSV-C does (Gargiulo
    et al., arXiv 2412.00081): r(m + n)/(mn)·(the dtype's bits) bits per entry; other tensors
    exact."""

    rank: int | None
    energy: float | None
    share: int | None = None

    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        if not _is_matrix(tuple(tau.shape)):
            return {"value": tau.contiguous()}
        u, s, vh = torch.linalg.svd(tau.float(), full_matrices=False)
        if self.rank is not None:
            r = min(self.rank, s.numel())
        elif self.share is not None:
            r = max(1, s.numel() // self.share)
        else:
            energy = torch.cumsum(s.double() ** 2, 0)
            total = float(energy[-1])
            target = (self.energy or 1.0) * total
            r = int(torch.searchsorted(energy, torch.tensor(target, dtype=torch.float64))) + 1
            r = min(r, s.numel()) if total > 0 else 1
        return {
            "us": (u[:, :r] * s[:r]).to(tau.dtype).contiguous(),
            "v": vh[:r].to(tau.dtype).contiguous(),
        }

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        if "value" in parts:
            return Exact("exact").decode(parts, shape, rows, name)
        us = parts["us"] if rows is None else part_rows(parts, "us", *rows)
        return us.float() @ parts["v"].float()


@dataclass(frozen=True)
class Sign(Codec):
    """τ̂ = α·sign(τ) per matrix, α = mean|τ| (BitDelta, Liu et al., arXiv 2402.10193; the
    α's may be distilled later, see :mod:`taskvec.store.calibrate`): 1 bit per entry plus one
    float32; other tensors exact."""

    def encode(self, tau: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        if not _is_matrix(tuple(tau.shape)):
            return {"value": tau.contiguous()}
        flat = tau.reshape(-1).float()
        bits = flat >= 0
        bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)])
        alpha = flat.abs().mean().reshape(1)
        return {"sign": pack_bits(bits, 1), "alpha": alpha}

    def decode(self, parts: Parts, shape: Shape, rows: Rows, name: str) -> torch.Tensor:
        if "value" in parts:
            return Exact("exact").decode(parts, shape, rows, name)
        start, stop = _span(shape, rows)
        b0, b1 = start // 8, -(-stop // 8)
        signs = unpack_bits(part_rows(parts, "sign", b0, b1), 1).float() * 2 - 1
        x = signs[start - 8 * b0 : stop - 8 * b0] * parts["alpha"].float()
        return x.reshape(_shape_of(shape, rows))


# --- the registry ---------------------------------------------------------------------------

_QUANT = re.compile(r"int([2348])(?:/g(\d+))?(?:/(absmax|minmax))?(/zstd)?")


def _number(text: str, what: str, cast: Callable[[str], float]) -> float:
    try:
        return cast(text)
    except ValueError:
        raise ConfigError(f"codec {what}: {text!r} is not a number") from None


def parse_codec(spec: str) -> Codec:
    """The codec a spec names: ``exact``, ``int4`` (= ``int4/g128/absmax/zstd``;
    ``int4/g128/absmax`` stores the codes as they are, ``int3/g64/minmax/zstd``),
    ``topk/0.1``, ``dare/0.9/s42``, ``lowrank/r16``, ``lowrank/e0.9`` or ``lowrank/t8``
    (rank ⌊min(m, n)/8⌋), ``sign``."""
    spec = spec.strip().lower()
    if spec == "exact":
        return Exact(spec)
    if spec == "sign":
        return Sign(spec)
    if m := _QUANT.fullmatch(spec):
        bits, group, mode = int(m[1]), int(m[2] or 128), m[3] or "absmax"
        if group < 8 or group % 8:
            raise ConfigError(f"codec {spec!r}: the group size must be a multiple of 8")
        zstd = bool(m[4]) or spec == f"int{bits}"
        name = f"int{bits}/g{group}/{mode}" + ("/zstd" if zstd else "")
        return GroupQuant(name, bits, group, mode == "absmax", zstd)
    head, _, rest = spec.partition("/")
    args = rest.split("/") if rest else []
    if head == "topk" and len(args) == 1:
        density = _number(args[0], spec, float)
        if not 0 < density <= 1:
            raise ConfigError(f"codec {spec!r}: the density must be in (0, 1]")
        return TopK(f"topk/{density:g}", density)
    if head == "dare" and len(args) == 2 and args[1].startswith("s"):
        p, seed = _number(args[0], spec, float), int(_number(args[1][1:], spec, int))
        if not 0 <= p < 1:
            raise ConfigError(f"codec {spec!r}: the drop rate must be in [0, 1)")
        return Dare(f"dare/{p:g}/s{seed}", p, seed)
    if head == "lowrank" and len(args) == 1 and args[0][:1] in ("r", "e", "t"):
        value = _number(args[0][1:], spec, float)
        if args[0][0] in "rt":
            if value < 1 or value != int(value):
                what = "rank" if args[0][0] == "r" else "number of tasks"
                raise ConfigError(f"codec {spec!r}: the {what} must be a positive integer")
            if args[0][0] == "t":
                return LowRank(f"lowrank/t{int(value)}", None, None, int(value))
            return LowRank(f"lowrank/r{int(value)}", int(value), None)
        if not 0 < value <= 1:
            raise ConfigError(f"codec {spec!r}: the energy fraction must be in (0, 1]")
        return LowRank(f"lowrank/e{value:g}", None, value)
    raise ConfigError(
        f"unknown codec {spec!r}; use exact, int8|int4|int3|int2[/gN][/absmax|minmax][/zstd], "
        "topk/DENSITY, dare/P/sSEED, lowrank/rR, lowrank/eFRACTION or lowrank/tTASKS, sign"
    )


def bits_per_parameter(parts: Parts, numel: int) -> float:
    """Stored bits per parameter of one encoded tensor: 8 × its parts' bytes / its entries."""
    stored = sum(p.numel() * p.element_size() for p in parts.values())
    return 8 * stored / max(1, numel)
