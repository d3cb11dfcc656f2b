"""The compiled per-block loops of ``taskvec analyze`` against numpy re-derivations."""

from __future__ import annotations

import numpy as np
import pytest

from taskvec.analyze.kernels import joint_counts, pair_sums, upper_histogram

TOL = 1e-3


@pytest.fixture
def block() -> np.ndarray:
    """(4, n) float32 like τ of bf16 models: many exact zeros, ties, both signs."""
    rng = np.random.default_rng(0)
    x = rng.normal(scale=1e-2, size=(4, 5001)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0
    x[:, :50] = np.float32(0.25)  # ties
    x[1, 50:80] = -x[0, 50:80]  # opposite signs
    x[2, 100:200] = TOL / 2  # changed by less than tol
    return x


@pytest.mark.parametrize("tasks", [0, 1, 3])
def test_pair_sums(block: np.ndarray, tasks: int) -> None:
    gram, max_abs, near_zero, both, differ = pair_sums(block, tasks, TOL)
    x = block.astype(np.float64)
    np.testing.assert_allclose(gram, x @ x.T, rtol=1e-12)
    assert np.array_equal(max_abs, np.abs(x).max(1))
    assert np.array_equal(near_zero, (np.abs(x) <= TOL).sum(1))
    c = np.abs(x[:tasks]) > TOL
    neg = x[:tasks] < 0
    for a in range(tasks):
        for b in range(tasks):
            assert both[a, b] == (c[a] & c[b]).sum()
            assert differ[a, b] == (c[a] & c[b] & (neg[a] != neg[b])).sum()
    assert both.shape == differ.shape == (tasks, tasks)


def test_pair_sums_empty_block() -> None:
    gram, max_abs, near_zero, both, _ = pair_sums(np.zeros((2, 0), np.float32), 2, TOL)
    assert not gram.any() and not max_abs.any() and not near_zero.any() and not both.any()


def test_upper_histogram(block: np.ndarray) -> None:
    bits = np.abs(block).view(np.int32)
    got = upper_histogram(bits, 1 << 15)
    key = 2 * (bits >> 16) + ((bits & 0xFFFF) != 0)
    for a, row in enumerate(key):
        want = np.bincount(row, minlength=1 << 16)
        want[0] = 0  # the zeros
        assert np.array_equal(got[a], want)


def test_joint_counts(block: np.ndarray) -> None:
    bits = np.abs(block).view(np.int32)
    lo = np.array([np.float32(0.01).view(np.int32), 1, np.float32(0.25).view(np.int32), 1 << 30])
    got = joint_counts(bits, lo)
    inside = bits >= lo[:, None]
    assert np.array_equal(got, inside.astype(np.int64) @ inside.T.astype(np.int64))
