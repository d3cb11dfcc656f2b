"""PLeaS algebra: matching against brute force, least squares against the normal equations,
permutation invariance, budget widths, and the budget-2 merge reproducing the ensemble."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from taskvec.errors import ConfigError, IncompatibleError
from taskvec.pleas import (
    MLPStack,
    ensemble_logits,
    match_layers,
    naive_average,
    permute_average,
    pleas_merge,
)
from taskvec.pleas.solve import least_squares


def random_stack(rng: np.random.Generator, sizes: list[int]) -> MLPStack:
    ws = tuple(rng.normal(size=(o, i)) / np.sqrt(i) for i, o in itertools.pairwise(sizes))
    bs = tuple(rng.normal(size=o) * 0.1 for o in sizes[1:])
    return MLPStack(ws, bs)


def random_perms(rng: np.random.Generator, stack: MLPStack) -> list[np.ndarray]:
    return [rng.permutation(d) for d in stack.widths[:-1]]


SIZES = [8, 16, 12, 5]


def test_permuted_copy_merges_to_same_function() -> None:
    rng = np.random.default_rng(0)
    a = random_stack(rng, SIZES)
    p = random_perms(rng, a)
    b = a.permuted(p)
    x, fresh = rng.normal(size=(300, 8)), rng.normal(size=(50, 8))
    np.testing.assert_allclose(b(fresh), a(fresh), atol=1e-12)
    perms, scores = match_layers(a, b, x)
    for got, q, s in zip(perms, p, scores, strict=True):
        np.testing.assert_array_equal(got, np.argsort(q))
        np.testing.assert_allclose(s, 1.0, atol=1e-12)
    np.testing.assert_allclose(permute_average(a, b, x)(fresh), a(fresh), atol=1e-10)
    for budget in (1.0, 1.5, 2.0):
        merged = pleas_merge(a, b, x, budget=budget, ridge=0.0)
        np.testing.assert_allclose(merged(fresh), a(fresh), atol=1e-8)
    assert not np.allclose(naive_average(a, b)(fresh), a(fresh), atol=1e-2)


def test_matching_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    a, b = random_stack(rng, [6, 5, 3]), random_stack(rng, [6, 5, 3])
    x = rng.normal(size=(200, 6))
    ha, hb = a.hidden(x)[0], b.hidden(x)[0]
    corr = np.corrcoef(ha.T, hb.T)[:5, 5:]
    best = max(itertools.permutations(range(5)), key=lambda q: corr[range(5), list(q)].sum())
    perms, _ = match_layers(a, b, x)
    np.testing.assert_array_equal(perms[0], best)


def test_least_squares_matches_normal_equations() -> None:
    rng = np.random.default_rng(2)
    h, y = rng.normal(size=(40, 7)), rng.normal(size=(40, 3))
    design = np.hstack([h, np.ones((40, 1))])
    for ridge in (0.0, 0.1):
        want = np.linalg.solve(design.T @ design + ridge * 40 * np.eye(8), design.T @ y)
        np.testing.assert_allclose(least_squares(h, y, ridge), want.T, atol=1e-10)


def test_first_layer_fits_averaged_matched_targets() -> None:
    rng = np.random.default_rng(3)
    a, b = random_stack(rng, SIZES), random_stack(rng, SIZES)
    x = rng.normal(size=(100, 8))
    perm = match_layers(a, b, x)[0][0]
    target = (x @ a.weights[0].T + a.biases[0] + (x @ b.weights[0].T + b.biases[0])[:, perm]) / 2
    design = np.hstack([x, np.ones((100, 1))])
    want = np.linalg.solve(design.T @ design, design.T @ target).T
    merged = pleas_merge(a, b, x, budget=1.0, ridge=0.0)
    np.testing.assert_allclose(merged.weights[0], want[:, :-1], atol=1e-10)
    np.testing.assert_allclose(merged.biases[0], want[:, -1], atol=1e-10)


def test_budget_widths_and_budget_two_is_the_ensemble() -> None:
    rng = np.random.default_rng(4)
    a, b = random_stack(rng, SIZES), random_stack(rng, SIZES)
    x, fresh = rng.normal(size=(400, 8)), rng.normal(size=(50, 8))
    assert pleas_merge(a, b, x, budget=1.0).widths == (16, 12, 5)
    assert pleas_merge(a, b, x, budget=1.5).widths == (24, 18, 5)
    both = pleas_merge(a, b, x, budget=2.0, ridge=0.0)
    assert both.widths == (32, 24, 5)
    np.testing.assert_allclose(both(fresh), ensemble_logits(a, b, fresh), atol=1e-8)


def test_bad_input_is_refused() -> None:
    rng = np.random.default_rng(5)
    a, b = random_stack(rng, SIZES), random_stack(rng, [8, 15, 12, 5])
    x = rng.normal(size=(30, 8))
    with pytest.raises(IncompatibleError, match="differ in architecture"):
        pleas_merge(a, b, x)
    with pytest.raises(ConfigError, match="budget"):
        pleas_merge(a, a, x, budget=3.0)
    with pytest.raises(IncompatibleError, match="data"):
        pleas_merge(a, a, np.zeros((0, 8)))
    with pytest.raises(IncompatibleError, match="do not chain"):
        MLPStack((np.zeros((4, 3)), np.zeros((2, 5))), (np.zeros(4), np.zeros(2)))
