"""WUDI-Merging: golden tests against a numpy Adam on the loss as written, properties.

``np_wudi`` transcribes the published procedure (shared/notes/methods.md §2.13): start from
Σᵢ τᵢ and take full-batch Adam steps on L(τ_m) = Σᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F, with the
gradient of the loss as written (products (τ_m − τᵢ) τᵢᵀ, then times τᵢ). ``torch_reference``
runs the reference code's loop shape (torch.optim.Adam and autograd on that loss).
Neither shares code with ``taskvec.methods.wudi``, which optimises in Gram space.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest
import torch
from conftest import call_matrix_method, f32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskvec.errors import ConfigError
from taskvec.methods.spectral import Tasks
from taskvec.methods.wudi import wudi_delta

wudi_module = importlib.import_module("taskvec.methods.wudi")

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


pytestmark = pytest.mark.usefixtures("one_thread")


def call(xs: np.ndarray, base: np.ndarray, tensor: str | None = None, **params: Any):
    return call_matrix_method("wudi", xs, base, tensor, **params)


def problem(n: int, shape: tuple[int, int], seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    base = f32(rng.normal(size=shape))
    rank = min(shape) // 2 + 1
    taus = [
        rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1])) / rank
        + 0.1 * rng.normal(size=shape)
        for _ in range(n)
    ]
    return base, f32(base + scale * np.stack(taus))


def np_loss(merged: np.ndarray, taus: np.ndarray) -> float:
    return float(
        sum(np.sum(((merged - tau) @ tau.T) ** 2) / np.sum(tau**2) for tau in taus if tau.any())
    )


def np_wudi(xs: np.ndarray, base: np.ndarray, steps: int = 300, lr: float = 1e-5) -> np.ndarray:
    taus = xs - base
    if base.ndim != 2:
        return base + taus.mean(0)
    x = taus.sum(0)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        g = sum(2 * ((x - tau) @ tau.T) @ tau / np.sum(tau**2) for tau in taus if tau.any())
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
    return base + x


def torch_reference(xs: np.ndarray, base: np.ndarray, steps: int = 300) -> np.ndarray:
    """The reference code's loop (float32, autograd, torch.optim.Adam), restated."""
    tvs = torch.tensor(xs - base, dtype=torch.float32)
    merged = torch.nn.Parameter(tvs.sum(0))
    opt = torch.optim.Adam([merged], lr=1e-5, weight_decay=0)
    norms = tvs.reshape(tvs.shape[0], -1).norm(dim=-1).square()
    for _ in range(steps):
        loss = (((merged[None] - tvs) @ tvs.mT).square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base + merged.detach().double().numpy()


def close(got: np.ndarray, want: np.ndarray, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * max(1.0, np.abs(want).max()))


# --------------------------------------------------------------------------------------------
# golden
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(12, 9), (9, 12), (3, 20), (20, 3)],  # (3, 20): in > 2·T·out, the factored path
)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("steps", [1, 7, 300])
def test_golden(shape: tuple[int, int], n: int, steps: int) -> None:
    base, xs = problem(n, shape, seed=shape[0] * 10 + n)
    close(call(xs, base, steps=steps), np_wudi(xs, base, steps))


def test_golden_options() -> None:
    base, xs = problem(3, (8, 6), seed=2, scale=0.01)
    close(call(xs, base, steps=50, lr=3e-4), np_wudi(xs, base, 50, 3e-4))
    close(call(xs, base, steps=0), base + (xs - base).sum(0))
    close(call(xs, base, steps=300.0), np_wudi(xs, base))  # config numbers arrive as floats


def test_matches_the_reference_loop_in_float32() -> None:
    """A float32 matrix above SMALL_NUMEL, against the reference's autograd + Adam loop."""
    base, xs = problem(3, (300, 240), seed=4, scale=0.01)
    got = call(xs, base, steps=25, step_tol=0.0)
    want = torch_reference(xs, base, steps=25)
    moved = np.abs(want - (base + (xs - base).sum(0))).max()
    assert moved > 1e-4
    assert np.abs(got - want).max() < 0.02 * moved


def test_vectors_and_embeddings_take_the_mean() -> None:
    rng = np.random.default_rng(1)
    base = f32(rng.normal(size=6))
    xs = f32(base + rng.normal(size=(3, 6)))
    close(call(xs, base), base + (xs - base).mean(0))
    base2, xs2 = problem(3, (7, 5), seed=3)
    close(call(xs2, base2, "bert.embeddings.word_embeddings.weight"), base2 + (xs2 - base2).mean(0))
    close(call(xs2, base2, "encoder.layer.0.output.dense.weight"), np_wudi(xs2, base2))


def test_bad_options_are_config_errors() -> None:
    base, xs = problem(2, (4, 3), seed=0)
    with pytest.raises(ConfigError, match="steps"):
        call(xs, base, steps=2.5)
    with pytest.raises(ConfigError, match="steps"):
        call(xs[:, 0], base[0], steps=-1)
    with pytest.raises(ConfigError, match="lr"):
        call(xs, base, lr=float("nan"))
    with pytest.raises(ConfigError, match="step_tol"):
        call(xs, base, step_tol=-0.1)
    with pytest.raises(ConfigError, match="step_tol"):
        call(xs, base, step_tol=1.0)
    with pytest.raises(ConfigError, match="gram_rank"):
        call(xs, base, gram_rank=1.5)


def test_models_equal_to_the_base_are_left_out_of_the_loss() -> None:
    base, xs = problem(2, (6, 5), seed=9)
    with_base = np.concatenate([xs, base[None]])
    close(call(with_base, base), np_wudi(xs, base))
    np.testing.assert_array_equal(call(np.repeat(base[None], 2, 0), base), base)


# --------------------------------------------------------------------------------------------
# windows of modelled gradients (step_tol > 0)
# --------------------------------------------------------------------------------------------


def fine_tune_like(n: int, shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Task vectors as fine-tuning leaves them: a few strong directions, a weak full-rank rest."""
    rng = np.random.default_rng(seed)
    base = f32(rng.normal(size=shape) * 0.02)
    taus = [
        rng.normal(size=(shape[0], 6)) @ rng.normal(size=(6, shape[1])) * 1e-3
        + rng.normal(size=shape) * 2e-4
        for _ in range(n)
    ]
    return base, f32(base + np.stack(taus))


def solve(xs: np.ndarray, base: np.ndarray, tol: float, rank: int = 16, steps: int = 300):
    tasks = Tasks(torch.tensor(xs), torch.tensor(base))
    delta, stats = wudi_delta(tasks, steps, 1e-5, tol, rank)
    return delta.double().numpy(), stats


@pytest.mark.parametrize(
    "shape",
    # (24, 256): A held as a factor; (300, 240): float32, window ends multiplied in bfloat16
    [(96, 160), (160, 96), (24, 256), (300, 240)],
)
def test_windows_follow_the_exact_trajectory(shape: tuple[int, int]) -> None:
    base, xs = fine_tune_like(3, shape, seed=shape[0])
    taus = xs - base
    start = taus.sum(0)
    exact, exact_stats = solve(xs, base, 0.0)
    assert exact_stats.products == 300 and exact_stats.max_error == 0.0
    close(exact + base, np_wudi(xs, base), atol=1e-6)
    got, stats = solve(xs, base, 0.1)
    assert stats.products < 250  # the point of the windows
    assert 0 < stats.max_error <= 0.1  # every accepted window within the tolerance
    moved = np.linalg.norm(exact - start)
    assert np.linalg.norm(got - exact) < 0.02 * moved
    assert abs(np_loss(got, taus) - np_loss(exact, taus)) < 0.001 * np_loss(start, taus)


@pytest.mark.parametrize("shape", [(96, 160), (300, 240)])
def test_windowed_loss_decreases_monotonically(shape: tuple[int, int]) -> None:
    base, xs = fine_tune_like(3, shape, seed=5)
    taus = xs - base
    losses = [np_loss(solve(xs, base, 0.1, steps=s)[0], taus) for s in (0, 5, 20, 80, 300)]
    for before, after in zip(losses, losses[1:], strict=False):
        assert after < before


def test_a_tight_tolerance_redoes_windows_and_stays_closer() -> None:
    base, xs = fine_tune_like(3, (96, 160), seed=7)
    start = (xs - base).sum(0)
    exact, _ = solve(xs, base, 0.0)
    loose, loose_stats = solve(xs, base, 0.3)
    tight, stats = solve(xs, base, 0.03)
    assert stats.rejected > 0 and stats.max_error <= 0.03
    assert stats.products > loose_stats.products
    moved = np.linalg.norm(exact - start)
    assert np.linalg.norm(tight - exact) < np.linalg.norm(loose - exact) < 0.05 * moved


def test_windows_are_reproducible_and_order_free() -> None:
    base, xs = fine_tune_like(3, (64, 96), seed=3)
    first, _ = solve(xs, base, 0.1, steps=60)
    np.testing.assert_array_equal(first, solve(xs, base, 0.1, steps=60)[0])
    swapped, _ = solve(xs[[2, 0, 1]], base, 0.1, steps=60)
    close(swapped, first, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])  # (160, 96): C₀ built by row chunks
def test_row_chunks_are_independent(shape: tuple[int, int], monkeypatch) -> None:
    base, xs = fine_tune_like(3, shape, seed=11)
    whole, _ = solve(xs, base, 0.0, steps=50)
    windowed, _ = solve(xs, base, 0.1, steps=50)
    monkeypatch.setattr(wudi_module, "CHUNK_ELEMENTS", 20 * shape[1])  # 20 rows a chunk
    chunked, _ = solve(xs, base, 0.0, steps=50)
    close(chunked, whole, atol=1e-9)
    chunked_windows, stats = solve(xs, base, 0.1, steps=50)
    assert stats.max_error <= 0.1
    start = (xs - base).sum(0)
    assert np.linalg.norm(chunked_windows - whole) < 0.03 * np.linalg.norm(whole - start)
    assert np.linalg.norm(windowed - whole) < 0.03 * np.linalg.norm(whole - start)


def test_small_matrices_and_rank_zero_are_exact() -> None:
    base, xs = fine_tune_like(2, (40, 30), seed=5)  # in = 30 ≤ 2 · 16
    exact, _ = solve(xs, base, 0.0, steps=40)
    for rank in (16, 0):
        got, stats = solve(xs, base, 0.1, rank=rank, steps=40)
        assert stats.products == 40
        np.testing.assert_array_equal(got, exact)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


@st.composite
def matrices(draw, n_min: int = 1, n_max: int = 4):
    n = draw(st.integers(n_min, n_max))
    shape = (draw(st.integers(2, 10)), draw(st.integers(2, 10)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.05, 1.0, 20.0]))
    return problem(n, shape, seed, scale)


@SETTINGS
@given(data=matrices(n_min=1, n_max=1))
def test_one_model_is_itself(data) -> None:
    base, xs = data
    close(call(xs, base), xs[0])


@SETTINGS
@given(data=matrices(n_min=2), perm_seed=st.integers(0, 1000))
def test_permutation_invariance(data, perm_seed: int) -> None:
    base, xs = data
    perm = np.random.default_rng(perm_seed).permutation(xs.shape[0])
    close(call(xs[perm], base, steps=40), call(xs, base, steps=40), atol=1e-6)


@SETTINGS
@given(data=matrices(n_min=2))
def test_loss_decreases_monotonically_from_task_arithmetic(data) -> None:
    """From the TA sum, every Adam step lowers the loss (the optimum is farther than the
    ≤ steps·lr per-entry path; task vector scales ≥ 0.05 here)."""
    base, xs = data
    taus = xs - base
    losses = [np_loss(call(xs, base, steps=s) - base, taus) for s in (0, 1, 2, 5, 10, 20, 40)]
    assert losses[-1] < losses[0]
    for before, after in zip(losses, losses[1:], strict=False):
        assert after <= before * (1 + 1e-6)
