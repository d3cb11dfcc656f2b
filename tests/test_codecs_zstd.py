"""The lossless Zstandard stage of intN codecs (``/zstd``): the same values as the plain codes,
fewer bytes for τ-like (peaked) tensors, and row ranges that decode alone across chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

from taskvec.store.codecs import bits_per_parameter, parse_codec


def _peaked(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Laplace-distributed entries, as a task vector's crowd around zero."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g) - 0.5
    return -0.01 * torch.sign(u) * torch.log1p(-2 * u.abs())


def test_a_bare_intn_is_the_compressed_default_and_explicit_specs_keep_their_meaning() -> None:
    assert parse_codec("int4").spec == "int4/g128/absmax/zstd"
    assert parse_codec("int2").spec == "int2/g128/absmax/zstd"
    assert parse_codec("int4/g128/absmax").spec == "int4/g128/absmax"  # stored records' meaning
    assert parse_codec("int3/g64/minmax/zstd").spec == "int3/g64/minmax/zstd"


@pytest.mark.parametrize("spec", ["int4/g8/absmax", "int3/g8/minmax", "int2/g8/absmax"])
def test_compression_is_lossless_and_decodes_row_ranges_across_chunks(spec: str) -> None:
    tau = _peaked((1100, 40), seed=1)  # 44000 entries: several chunks of 4096 groups at g8
    plain, coded = parse_codec(spec), parse_codec(spec + "/zstd")
    shape = tuple(tau.shape)
    want = plain.decode(plain.encode(tau, "w"), shape, None, "w")
    parts = coded.encode(tau, "w")
    assert "codes" not in parts and parts["zoff"].numel() > 2
    assert torch.equal(coded.decode(parts, shape, None, "w"), want)
    for rows in [(0, 1), (800, 900), (200, 1100), (1099, 1100)]:  # 819.2 rows per chunk at g8
        got = coded.decode(parts, shape, rows, "w")
        assert torch.equal(got, want[rows[0] : rows[1]])


def test_the_chunks_are_zstandard_frames_of_the_plain_packed_codes() -> None:
    tau = _peaked((300, 64), seed=2)
    plain = parse_codec("int4/g16/absmax").encode(tau, "w")
    coded = parse_codec("int4/g16/absmax/zstd").encode(tau, "w")
    off, data = coded["zoff"].tolist(), coded["zcodes"].numpy().tobytes()
    unzip = zstandard.ZstdDecompressor()
    inflated = b"".join(unzip.decompress(data[a:b]) for a, b in zip(off, off[1:], strict=False))
    assert inflated == plain["codes"].numpy().tobytes()
    torch.testing.assert_close(coded["scale"], plain["scale"], rtol=0, atol=0)


def test_peaked_codes_take_well_under_four_bits() -> None:
    tau = _peaked((256, 512), seed=3)
    n = tau.numel()
    plain = parse_codec("int4/g128/absmax").encode(tau, "w")
    coded = parse_codec("int4").encode(tau, "w")
    assert bits_per_parameter(plain, n) == pytest.approx(4 + 32 / 128)
    stored = sum(p.numel() * p.element_size() for p in coded.values())
    assert bits_per_parameter(coded, n) == pytest.approx(8 * stored / n)
    # the codes' empirical entropy bounds what a per-byte Huffman code can reach from below
    assert bits_per_parameter(coded, n) < 3.5
    codes = np.frombuffer(plain["codes"].numpy().tobytes(), np.uint8)
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    byte_entropy = float(-(p * np.log2(p)).sum())  # bits per byte = per 2 codes
    assert 8 * coded["zcodes"].numel() / n >= byte_entropy / 2 - 1e-9
