"""Activation matching (Git Re-Basin, Ainsworth et al., ICLR 2023): per hidden layer, the
permutation ``π`` of model B's units maximising ``Σ_i corr(h_A[:, i], h_B[:, π(i)])``, found by
``scipy.optimize.linear_sum_assignment`` on the Pearson correlation of unlabelled activations."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from taskvec.pleas.stack import MLPStack


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation ``[i, j]`` between column ``i`` of ``a`` and column ``j`` of ``b``
    (a constant column correlates 0 with everything)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na = np.linalg.norm(a, axis=0)
    nb = np.linalg.norm(b, axis=0)
    na[na == 0] = np.inf
    nb[nb == 0] = np.inf
    return (a.T @ b) / np.outer(na, nb)


def match_layers(a: MLPStack, b: MLPStack, x: np.ndarray) -> tuple[list[np.ndarray], list]:
    """Per hidden layer: ``perm`` (B's unit matched to A's unit ``i`` is ``perm[i]``) and the
    matched pairs' correlations ``corr[i, perm[i]]``."""
    a.check_same_shape(b)
    perms, scores = [], []
    for ha, hb in zip(a.hidden(x), b.hidden(x), strict=True):
        c = correlation(ha, hb)
        rows, cols = linear_sum_assignment(c, maximize=True)
        perm = cols[np.argsort(rows)]
        perms.append(perm)
        scores.append(c[np.arange(len(perm)), perm])
    return perms, scores
