"""Store codecs against numpy re-derivations of their formulas, on small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskvec.errors import ConfigError
from taskvec.store.codecs import bits_per_parameter, pack_bits, parse_codec, unpack_bits


def _tau(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.01


def _roundtrip(spec: str, tau: torch.Tensor, name: str = "w") -> tuple[np.ndarray, dict]:
    codec = parse_codec(spec)
    parts = codec.encode(tau, name)
    return codec.decode(parts, tuple(tau.shape), None, name).numpy(), parts


def _groups(x: np.ndarray, g: int) -> np.ndarray:
    flat = x.reshape(-1)  # float32, as the codec computes
    return np.concatenate([flat, np.zeros(-flat.size % g, np.float32)]).reshape(-1, g)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(40, 24), (1000,), (3, 5, 7)])
def test_pack_bits_round_trips(bits: int, shape: tuple[int, ...]) -> None:
    n = -(-int(np.prod(shape)) // 8) * 8
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == n * bits // 8
    assert torch.equal(unpack_bits(packed, bits), codes.to(torch.uint8))
    # the layout: code i at bits [bits·i, bits·(i+1)) of a little-endian bit stream
    stream = (codes.numpy()[:, None] >> np.arange(bits)) & 1
    want = np.packbits(stream.reshape(-1).astype(np.uint8), bitorder="little")
    np.testing.assert_array_equal(packed.numpy(), want)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_absmax_matches_numpy_and_errs_at_most_half_a_step(bits: int) -> None:
    tau = _tau((37, 29))  # 1073 entries: the last group is padded
    got, parts = _roundtrip(f"int{bits}/g64/absmax", tau)
    x = _groups(tau.numpy(), 64)
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(x).max(1, keepdims=True) / levels
    want = (np.clip(np.round(x / scale), -levels, levels) * scale).reshape(-1)[: tau.numel()]
    step = np.repeat(scale[:, 0], 64)[: tau.numel()]
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-6)
    assert np.all(np.abs(got.reshape(-1) - tau.numpy().reshape(-1)) <= step / 2 * (1 + 1e-5))
    np.testing.assert_allclose(parts["scale"].numpy(), scale[:, 0], rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_minmax_matches_numpy(bits: int) -> None:
    tau = _tau((16, 48), seed=1) + 0.003  # off-centre: min-max uses the range
    got, _ = _roundtrip(f"int{bits}/g32/minmax", tau)
    x = _groups(tau.numpy(), 32)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    want = lo + np.clip(np.round((x - lo) / scale), 0, 2**bits - 1) * scale
    np.testing.assert_allclose(got.reshape(-1), want.reshape(-1), rtol=1e-6, atol=1e-9)
    assert np.all(np.abs(got - tau.numpy()) <= np.repeat(scale, 32).max() / 2 * (1 + 1e-5))


def test_int4_bits_per_parameter_is_four_plus_the_scales() -> None:
    _, parts = _roundtrip("int4/g128/absmax", _tau((64, 256)))  # codes as they are, f32 scales
    assert bits_per_parameter(parts, 64 * 256) == pytest.approx(4 + 32 / 128)
    _, parts = _roundtrip("int2/g64/minmax", _tau((64, 256)))
    assert bits_per_parameter(parts, 64 * 256) == pytest.approx(2 + 64 / 64)


def test_quantising_a_zero_group_gives_zeros() -> None:
    tau = torch.zeros(8, 16)
    tau[0, :3] = torch.tensor([1e-3, -2e-3, 5e-4])
    got, _ = _roundtrip("int4/g16/absmax", tau)
    assert np.all(got[1:] == 0) and np.all(np.isfinite(got))


def test_topk_keeps_the_largest_entries_exactly() -> None:
    tau = _tau((30, 20), seed=2)
    got, parts = _roundtrip("topk/0.1", tau)
    flat = tau.numpy().reshape(-1)
    keep = np.argsort(-np.abs(flat))[:60]
    want = np.zeros_like(flat)
    want[keep] = flat[keep]
    np.testing.assert_array_equal(got.reshape(-1), want)
    assert parts["index"].dtype == torch.int32


def test_dare_redraws_its_mask_from_the_seed() -> None:
    tau = _tau((50, 40), seed=3)
    got, parts = _roundtrip("dare/0.75/s7", tau, "layer.w")
    kept = got != 0
    assert 0.2 < kept.mean() < 0.3
    np.testing.assert_allclose(got[kept], tau.numpy()[kept] / 0.25, rtol=1e-6)
    assert parts["value"].numel() == kept.sum()  # only the kept values are stored
    again, _ = _roundtrip("dare/0.75/s7", tau, "layer.w")
    other, _ = _roundtrip("dare/0.75/s8", tau, "layer.w")
    np.testing.assert_array_equal(got, again)
    assert not np.array_equal(got != 0, other != 0)


def test_lowrank_is_the_truncated_svd() -> None:
    tau = _tau((24, 18), seed=4)
    got, parts = _roundtrip("lowrank/r3", tau)
    u, s, vt = np.linalg.svd(tau.numpy().astype(np.float64), full_matrices=False)
    want = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert parts["us"].shape == (24, 3) and parts["v"].shape == (3, 18)
    got_e, parts_e = _roundtrip("lowrank/e0.5", tau)
    energy = np.cumsum(s**2) / np.sum(s**2)
    assert parts_e["v"].shape[0] == int(np.searchsorted(energy, 0.5)) + 1
    vec, _ = _roundtrip("lowrank/r3", _tau((10,)))  # vectors are kept exactly
    np.testing.assert_array_equal(vec, _tau((10,)).numpy())
    got_t, parts_t = _roundtrip("lowrank/t4", tau)  # TSV-C: one task's share, ⌊18/4⌋ = 4
    np.testing.assert_allclose(got_t, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-6)
    assert parts_t["v"].shape == (4, 18)
    _, parts_t = _roundtrip("lowrank/t40", tau)  # never below rank 1
    assert parts_t["v"].shape == (1, 18)


def test_sign_is_mean_magnitude_times_sign() -> None:
    tau = _tau((13, 11), seed=5)
    got, parts = _roundtrip("sign", tau)
    x = tau.numpy()
    want = np.abs(x).mean() * np.where(x >= 0, 1.0, -1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert bits_per_parameter(parts, x.size) < 1.3  # 1 bit + one float32 over 143 entries


@pytest.mark.parametrize(
    "spec",
    [
        "exact",
        "int4/g64/absmax",
        "int3/g16/minmax",
        "topk/0.3",
        "dare/0.5/s1",
        "lowrank/r2",
        "sign",
    ],
)
def test_row_ranges_decode_as_the_whole_tensor_does(spec: str) -> None:
    tau = _tau((21, 13), seed=6)  # rows do not align with groups or packed bytes
    codec = parse_codec(spec)
    parts = codec.encode(tau, "t")
    whole = codec.decode(parts, (21, 13), None, "t")
    for rows in [(0, 1), (3, 8), (20, 21), (5, 21)]:
        part = codec.decode(parts, (21, 13), rows, "t")
        # the same values; a low-rank product may round differently per block of rows
        torch.testing.assert_close(part, whole[rows[0] : rows[1]], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "spec", ["int5", "int4/g12", "topk/0", "dare/1/s3", "lowrank/r0", "lowrank/t0", "zip"]
)
def test_bad_codec_specs_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_codec(spec)


@pytest.mark.parametrize("spec", ["int4/g64/absmax", "int3/g32/minmax", "int8/g128/absmax"])
def test_bfloat16_is_quantised_as_its_float32_values(spec: str) -> None:
    from taskvec.store import kernels

    tau = (_tau((33, 47), seed=9) * 7).to(torch.bfloat16)  # read as raw bits by the kernels
    tau[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -3.5, 2.0**-130])  # zeros, tiny, subnormal
    codec = parse_codec(spec)
    got, err = codec.encode_measured(tau, "w")
    want, err_want = codec.encode_measured(tau.float(), "w")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert err == pytest.approx(err_want, rel=1e-12)
    x = tau.float().numpy().astype(np.float64)
    norm2, nonzero = kernels.moments(kernels.kernel_input(tau))
    assert norm2 == pytest.approx(float((x**2).sum()), rel=1e-12)
    assert nonzero == int(np.count_nonzero(x))


@pytest.mark.parametrize("spec", ["int4/g64/absmax", "int4", "int3/g32/minmax"])
def test_parts_shorter_than_the_shape_are_refused_not_overrun(spec: str) -> None:
    codec = parse_codec(spec)
    parts = codec.encode(_tau((20, 64), seed=3), "w")
    short = dict(parts)
    short["scale"] = parts["scale"][:-1]
    with pytest.raises(ValueError, match="shorter"):
        codec.decode(short, (20, 64), None, "w")
    if "codes" in parts:
        short = {**parts, "codes": parts["codes"][:-8]}
        with pytest.raises(ValueError, match="shorter"):
            codec.decode(short, (20, 64), (10, 20), "w")
