"""TSV-M, Iso-C and Iso-CTS: golden tests against numpy transcriptions, properties, end to end.

The numpy functions below transcribe the published algorithms (shared/notes/methods.md §2.11,
§2.12) step by step, as the reference code lays them out: full SVDs, the top-k blocks placed
in zero-padded r-column matrices, and polar factors P Qᵀ from a second SVD. They share no code
with ``taskvec.methods.spectral``, which truncates and orthogonalises through Gram
eigendecompositions instead. Inputs are low-rank task vectors plus a small full-rank part, so
every singular value is clearly non-zero and the reference is well defined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call_matrix_method, f32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from taskvec.errors import ConfigError
from taskvec.merge import merge as tv_merge
from taskvec.methods.spectral import iso_cts_split, polar, polar_extend

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


pytestmark = pytest.mark.usefixtures("one_thread")


SPECTRAL = ["tsv", "iso_c", "iso_cts"]


call = call_matrix_method


def problem(
    n: int, shape: tuple[int, int], seed: int, rank: int = 3, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """(base, xs): each τᵢ = a rank-`rank` matrix plus `noise` of full rank."""
    rng = np.random.default_rng(seed)
    base = f32(rng.normal(size=shape))
    taus = [
        rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1])) / np.sqrt(rank)
        + noise * rng.normal(size=shape)
        for _ in range(n)
    ]
    return base, f32(base + np.stack(taus))


def decaying(
    n: int, shape: tuple[int, int], seed: int, power: float
) -> tuple[np.ndarray, np.ndarray]:
    """(base, xs) with τᵢ = Uᵢ diag(j^-power) Vᵢᵀ, random orthonormal Uᵢ, Vᵢ."""
    rng = np.random.default_rng(seed)
    r = min(shape)
    base = f32(rng.normal(size=shape))
    taus = []
    for _ in range(n):
        u = np.linalg.qr(rng.normal(size=(shape[0], r)))[0]
        v = np.linalg.qr(rng.normal(size=(shape[1], r)))[0]
        taus.append((u * np.arange(1, r + 1) ** -power) @ v.T)
    return base, f32(base + np.stack(taus))


def close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-5) -> None:
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# numpy transcriptions (float64)
# --------------------------------------------------------------------------------------------


def np_polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def np_tsv(xs: np.ndarray, base: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    taus = xs - base
    t = taus.shape[0]
    if base.ndim != 2:
        return base + alpha * taus.mean(0)
    m, n = base.shape
    r = min(m, n)
    k = r // t
    big_u, big_s, big_vt = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i in range(t):
        u, s, vt = np.linalg.svd(taus[i], full_matrices=False)
        big_u[:, i * k : (i + 1) * k] = u[:, :k]
        big_s[i * k : (i + 1) * k] = s[:k]
        big_vt[i * k : (i + 1) * k, :] = vt[:k, :]
    merged = np_polar(big_u) @ np.diag(big_s) @ np_polar(big_vt)
    return base + alpha * merged


def np_iso_c(xs: np.ndarray, base: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    taus = xs - base
    if base.ndim != 2:
        return base + alpha * taus.mean(0)
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    return base + alpha * (u @ np.diag(np.full_like(s, s.mean())) @ vt)


def np_iso_cts(
    xs: np.ndarray, base: np.ndarray, alpha: float = 1.0, fraction: float = 0.8
) -> np.ndarray:
    taus = xs - base
    t = taus.shape[0]
    if base.ndim != 2:
        return base + alpha * taus.mean(0)
    m, n = base.shape
    r = min(m, n)
    kc = int(r * fraction)
    kc = r - round((r - kc) / t) * t
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    uc, sc, vct = u[:, :kc], s[:kc], vt[:kc, :]
    per = (r - kc) // t
    big_u, big_s, big_vt = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i in range(t):
        w = taus[i] - uc @ uc.T @ taus[i]
        ui, si, vti = np.linalg.svd(w, full_matrices=False)
        big_u[:, i * per : (i + 1) * per] = ui[:, :per]
        big_s[i * per : (i + 1) * per] = si[:per]
        big_vt[i * per : (i + 1) * per, :] = vti[:per, :]
    big_u[:, t * per :] = uc
    big_s[t * per :] = sc
    big_vt[t * per :, :] = vct
    merged = np_polar(big_u) @ np.diag(np.full(r, big_s.mean())) @ np_polar(big_vt)
    return base + alpha * merged


NUMPY = {"tsv": np_tsv, "iso_c": np_iso_c, "iso_cts": np_iso_cts}


# --------------------------------------------------------------------------------------------
# golden
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("shape", [(12, 9), (8, 13), (10, 10)])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_golden_small(name: str, shape: tuple[int, int], n: int) -> None:
    base, xs = problem(n, shape, seed=n * 100 + shape[0])
    close(call(name, xs, base), NUMPY[name](xs, base))


@pytest.mark.parametrize("name", SPECTRAL)
def test_golden_alpha_and_options(name: str) -> None:
    base, xs = problem(3, (11, 14), seed=5)
    close(call(name, xs, base, alpha=0.7), NUMPY[name](xs, base, alpha=0.7))
    if name == "iso_cts":
        for f in (0.5, 0.9, 1.0):  # (f = 0 with r = 11, T = 3 makes the reference slice k_c = -1)
            got = call(name, xs, base, common_space_fraction=f)
            close(got, np_iso_cts(xs, base, fraction=f))


@pytest.mark.parametrize("name", SPECTRAL)
def test_golden_vectors_and_embeddings_take_the_mean(name: str) -> None:
    rng = np.random.default_rng(3)
    base = f32(rng.normal(size=7))
    xs = f32(base + rng.normal(size=(3, 7)))
    close(call(name, xs, base, alpha=1.5), base + 1.5 * (xs - base).mean(0))
    base2, xs2 = problem(3, (9, 6), seed=4)
    want = base2 + 1.5 * (xs2 - base2).mean(0)
    close(call(name, xs2, base2, "model.embed_tokens.weight", alpha=1.5), want)
    # the same matrix under another name takes the matrix rule
    close(call(name, xs2, base2, "lm_head.weight", alpha=1.5), NUMPY[name](xs2, base2, 1.5))


def test_iso_cts_split_matches_the_reference_rounding() -> None:
    # r = 384, T = 3: ⌊0.8·384⌋ = 307, round(77/3) = 26, so k_c = 306
    assert iso_cts_split(384, 3, 0.8) == (306, 26)
    assert iso_cts_split(768, 8, 0.8) == (616, 19)
    assert iso_cts_split(10, 4, 0.8) == (10, 0)  # round(2/4) = 0 (banker's rounding)
    assert iso_cts_split(5, 3, 0.0) == (2, 1)  # round(5/3)·3 = 6 > 5: capped at ⌊5/3⌋


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("shape", [(280, 240), (240, 280)])
def test_golden_float32_path(name: str, shape: tuple[int, int]) -> None:
    """Matrices above SMALL_NUMEL are float32, decomposed through float64 Gram matrices."""
    base, xs = decaying(4, shape, seed=1, power=1.0)
    got = call(name, xs, base)
    want = NUMPY[name](xs, base)
    assert np.linalg.norm(got - want) / np.linalg.norm(want - base) < 1e-4


def test_bad_options_are_config_errors() -> None:
    base, xs = problem(2, (5, 4), seed=0)
    with pytest.raises(ConfigError, match="common_space_fraction"):
        call("iso_cts", xs, base, common_space_fraction=1.5)
    with pytest.raises(ConfigError, match="common_space_fraction"):
        call("iso_cts", xs[:, 0], base[0], common_space_fraction=-0.1)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


@st.composite
def matrices(draw, n_min: int = 1, n_max: int = 4):
    n = draw(st.integers(n_min, n_max))
    shape = (draw(st.integers(2, 12)), draw(st.integers(2, 12)))
    seed = draw(st.integers(0, 2**31 - 1))
    rank = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    base, xs = problem(n, shape, seed, rank=rank)
    return base, f32(base + scale * (xs - base))


def singular_values(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x, compute_uv=False)


@SETTINGS
@given(data=matrices(n_min=1, n_max=1))
def test_one_model(data) -> None:
    """T = 1: TSV gives the model back; Iso-C and Iso-CTS both flatten τ's spectrum."""
    base, xs = data
    close(call("tsv", xs, base), xs[0], rtol=1e-5)
    flat = np_iso_c(xs, base)
    close(call("iso_c", xs, base), flat)
    close(call("iso_cts", xs, base), flat)


@SETTINGS
@given(data=matrices(n_min=2), perm_seed=st.integers(0, 1000))
@pytest.mark.parametrize("name", SPECTRAL)
def test_permutation_invariance(name: str, data, perm_seed: int) -> None:
    base, xs = data
    perm = np.random.default_rng(perm_seed).permutation(xs.shape[0])
    close(call(name, xs[perm], base), call(name, xs, base), rtol=1e-5)


@SETTINGS
@given(data=matrices())
def test_factors_are_orthogonal(data) -> None:
    """After the polar step the factors have orthonormal columns, so TSV's merged matrix has
    exactly the concatenated top-k singular values, and Iso-C / Iso-CTS a flat spectrum."""
    base, xs = data
    taus = xs - base
    t = taus.shape[0]
    r = min(base.shape)
    k = r // t
    s_cat = np.concatenate([singular_values(tau)[:k] for tau in taus])
    got = singular_values(call("tsv", xs, base) - base)
    want = np.sort(np.concatenate([s_cat, np.zeros(r - s_cat.size)]))[::-1]
    floor = 1e-6 * np.abs(base).max()  # the merged θ is float32: Δ carries ε·|θ| rounding
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * want.max() + floor)
    for name in ("iso_c", "iso_cts"):
        s = singular_values(call(name, xs, base) - base)
        np.testing.assert_allclose(s, np.full(r, s.mean()), rtol=1e-4, atol=floor)


@SETTINGS
@given(
    m=st.integers(1, 40),
    p=st.integers(1, 40),
    rank=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_polar_factor(m: int, p: int, rank: int, seed: int, dtype: torch.dtype) -> None:
    """polar(x) = P Qᵀ; for rank-deficient x the partial isometry on its range."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, min(rank, m, p))) @ rng.normal(size=(min(rank, m, p), p))
    got = polar(torch.tensor(x, dtype=dtype)).double().numpy()
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > 1e-6 * s[0]
    want = u[:, keep] @ vt[keep]
    np.testing.assert_allclose(got, want, atol=2e-4 if dtype == torch.float32 else 1e-8)
    np.testing.assert_allclose(got @ got.T @ got, got, atol=1e-3)


def orthonormal(rng: np.random.Generator, m: int, p: int) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(m, p)))[0]


@SETTINGS
@given(
    m=st.integers(2, 40),
    a=st.integers(0, 20),
    b=st.integers(0, 20),
    overlap=st.sampled_from([0.0, 0.5, 1.0]),
    rank=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_polar_extend(m, a, b, overlap, rank, seed, dtype) -> None:
    """polar([A | B]) for orthonormal (float64) A, through the small problem, equals the direct
    one, also when B lies partly in span(A) or is rank-deficient (float64: to 1e-5, as the
    small problem is a Gram matrix and squares the condition number)."""
    a, b = min(a, m), min(b, m - min(a, m))
    rng = np.random.default_rng(seed)
    left = orthonormal(rng, m, a)
    right = rng.normal(size=(m, min(rank, b))) @ rng.normal(size=(min(rank, b), b))
    right += overlap * left @ rng.normal(size=(a, b))
    got = polar_extend(torch.tensor(left), torch.tensor(right, dtype=dtype))
    want = polar(torch.tensor(np.concatenate([left, right], 1), dtype=torch.float64)).numpy()
    np.testing.assert_allclose(
        got.double().numpy(), want, atol=1e-4 if dtype == torch.float32 else 1e-5
    )


@SETTINGS
@given(data=matrices(), alpha=st.sampled_from([0.0, 0.5, 2.0]))
@pytest.mark.parametrize("name", SPECTRAL)
def test_alpha_scales_the_merged_task_vector(name: str, data, alpha: float) -> None:
    base, xs = data
    one = call(name, xs, base) - base
    close(call(name, xs, base, alpha=alpha), base + alpha * one, rtol=1e-5)


@pytest.mark.parametrize("name", SPECTRAL)
def test_degenerate_inputs_are_deterministic(name: str) -> None:
    """Models equal to the base, identical models and rows nobody changed: no arbitrary
    directions appear (the reference would add LAPACK's null-space basis there)."""
    base, xs = problem(2, (9, 7), seed=8)
    with_base = np.concatenate([xs, base[None]])
    untouched = xs.copy()
    untouched[:, 0] = base[0]
    out = call(name, untouched, base)
    np.testing.assert_array_equal(out[0], base[0])
    if name == "tsv":
        # T identical task vectors: τ's best rank-⌊r/T⌋ approximation, not arbitrary junk
        u, sv, vt = np.linalg.svd(xs[0] - base)
        close(call(name, np.repeat(xs[:1], 3, 0), base), base + (u[:, :2] * sv[:2]) @ vt[:2])
        want = np_tsv(xs, base)  # the base adds nothing; k shrinks from ⌊7/2⌋ to ⌊7/3⌋
        assert np.linalg.norm(call(name, with_base, base) - want) < np.linalg.norm(want - base)
    elif name == "iso_c":
        close(call(name, with_base, base), np_iso_c(xs, base))  # Σ τᵢ is unchanged
    else:  # T changes the split, but the zero task adds no direction
        u, sv, vt = np.linalg.svd(call(name, with_base, base) - base)
        assert np.isclose(sv, sv[0], rtol=1e-4).sum() < min(base.shape)
    assert np.isfinite(call(name, np.repeat(base[None], 3, 0), base)).all()
    np.testing.assert_array_equal(call(name, np.repeat(base[None], 3, 0), base), base)


# --------------------------------------------------------------------------------------------
# end to end through a config
# --------------------------------------------------------------------------------------------


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    save_file(
        {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()},
        str(path / "model.safetensors"),
    )
    return path


@pytest.mark.parametrize("name", [*SPECTRAL, "wudi"])
def test_merge_config_end_to_end(tmp_path: Path, name: str) -> None:
    shapes = {
        "model.embed_tokens.weight": (11, 6),
        "model.layers.0.mlp.up_proj.weight": (10, 6),
        "model.layers.0.mlp.down_proj.weight": (6, 10),
        "model.layers.0.input_layernorm.weight": (6,),
    }
    rng = np.random.default_rng(0)
    base = {k: f32(rng.normal(size=s)) for k, s in shapes.items()}
    models = [{k: f32(v + 0.1 * rng.normal(size=v.shape)) for k, v in base.items()} for _ in "abc"]
    b = _write(tmp_path / "base", base)
    paths = [_write(tmp_path / f"m{i}", sd) for i, sd in enumerate(models)]
    params = {} if name == "wudi" else {"alpha": 0.8}
    cfg = {
        "merge_method": name,
        "base_model": str(b),
        "models": [{"model": str(p)} for p in paths],
        "parameters": params,
    }
    tv_merge(cfg, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    alpha = params.get("alpha", 1.0)
    for key, b0 in base.items():
        xs = np.stack([sd[key] for sd in models])
        got = out[key].double().numpy()
        if b0.ndim == 1 or "embed" in key:
            close(got, b0 + alpha * (xs - b0).mean(0))
        elif name == "wudi":
            assert not np.allclose(got, b0 + (xs - b0).sum(0), atol=1e-6)  # it moved
            assert np.abs(got - (b0 + (xs - b0).sum(0))).max() <= 300 * 1e-5 * 1.01
        else:
            close(got, NUMPY[name](xs, b0, alpha))
