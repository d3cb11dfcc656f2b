"""Exact rank windows (sparsify.rank_window) against a brute-force ranking, ties and zeros
included, with scans small enough to cross chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec.methods import sparsify


def brute_window(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Mask of the entries of rank [start, stop): by |x| descending, then position."""
    order = np.lexsort((np.arange(x.size), -np.abs(x)))
    mask = np.zeros(x.size, dtype=bool)
    mask[order[start:stop]] = True
    return mask


values = st.lists(
    st.sampled_from([0.0, -0.0, 1e-40, -1e-40, 0.5, -0.5, 0.25, 1.0, -1.0, 3.0, 1.0000001]),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(xs=values, a=st.integers(0, 45), b=st.integers(0, 45), scan=st.sampled_from([3, 7, 1 << 22]))
def test_rank_window_matches_brute_force(xs: list[float], a: int, b: int, scan: int) -> None:
    x = np.array(xs, dtype=np.float32)
    start, stop = min(a, b), max(a, b)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sparsify, "_SCAN", scan)
        got = sparsify.rank_window(torch.from_numpy(x), start, stop).mask(torch.from_numpy(x).abs())
    want = brute_window(x, start, stop)
    # which zeros are kept is irrelevant (they add nothing); everything else must match
    nonzero = x != 0
    np.testing.assert_array_equal(got.numpy()[nonzero], want[nonzero])


def test_rank_window_on_bfloat16_like_ties() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5000, generator=g) * 1e-3).bfloat16().float()
    for start, stop in [(0, 2500), (50, 4500), (0, 1), (4999, 5000), (10, 11)]:
        got = sparsify.rank_window(x, start, stop).mask(x.abs()).numpy()
        np.testing.assert_array_equal(got, brute_window(x.numpy(), start, stop))
        assert got.sum() == stop - start


magnitudes = st.lists(
    st.sampled_from([0.0, -0.0, 1e-40, 0.5, 0.25, 1.0, 3.0, 1.0000001, 2.0**-126]),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(xs=magnitudes, rows=st.integers(1, 4))
def test_row_order_is_a_stable_argsort(xs: list[float], rows: int) -> None:
    """The sort of (bits, column) keys is exactly torch's stable argsort of the bits: ties
    (and +0 / −0) in position order."""
    rows = min(rows, len(xs))
    cols = len(xs) // rows
    m = torch.tensor(xs[: rows * cols], dtype=torch.float32).reshape(rows, cols)
    want = m.view(torch.int32).argsort(dim=1, stable=True)
    assert torch.equal(sparsify.row_order(m), want)
    assert torch.equal(sparsify.row_order(m.abs()), m.abs().argsort(dim=1, stable=True))


@pytest.mark.parametrize("cols", [2, 3, 1024, 1025, 5632])
def test_row_order_on_bfloat16_deltas(cols: int) -> None:
    g = torch.Generator().manual_seed(cols)
    base = (torch.randn(6, cols, generator=g) * 0.02).bfloat16()
    tuned = (base.float() + torch.randn(6, cols, generator=g) * 2e-4).bfloat16()
    m = (tuned.float() - base.float()).abs()  # few distinct values: long runs of ties
    assert torch.equal(sparsify.row_order(m), m.argsort(dim=1, stable=True))
    assert torch.equal(sparsify.row_order(m.double()), m.double().argsort(dim=1, stable=True))
