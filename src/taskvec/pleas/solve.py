"""PLeaS (Nasery et al., CVPR 2025, arXiv 2407.02447, §3): after activation matching, each
hidden layer keeps ``w = round(budget·d)`` units (``d ≤ w ≤ 2d``): the ``k = 2d − w``
best-correlated matched pairs are merged, the other units are kept from both models. Layer by
layer, on unlabelled inputs ``x``, the merged layer ``[W | b]`` minimises

    ‖[H_m, 1] [W | b]ᵀ − Y‖² + λ‖[W | b]‖²

where ``H_m`` is the merged model's own previous hidden output and ``Y`` the target
pre-activations: ``(z_A[:, i] + z_B[:, π(i)]) / 2`` for a merged pair, ``z_A[:, i]`` or
``z_B[:, π(i)]`` for a kept unit, ``(z_A + z_B) / 2`` for the logits."""

from __future__ import annotations

import numpy as np

from taskvec.errors import ConfigError, IncompatibleError
from taskvec.pleas.matching import match_layers
from taskvec.pleas.stack import MLPStack


def merged_width(d: int, budget: float) -> int:
    """Units a hidden layer of width ``d`` keeps under ``budget`` (1 = original, 2 = both)."""
    return int(min(2 * d, max(d, round(budget * d))))


def least_squares(inputs: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """``[W | b]`` (``[out, in+1]``) minimising the ridge objective above; ``λ = ridge·n``."""
    n = inputs.shape[0]
    design = np.hstack([inputs, np.ones((n, 1))])
    if ridge > 0:
        reg = np.sqrt(ridge * n) * np.eye(design.shape[1])
        design = np.vstack([design, reg])
        targets = np.vstack([targets, np.zeros((reg.shape[0], targets.shape[1]))])
    sol, *_ = np.linalg.lstsq(design, targets, rcond=None)
    return sol.T


def _layer_targets(za: np.ndarray, zb: np.ndarray, perm: np.ndarray, score, width: int):
    d = za.shape[1]
    order = np.argsort(-score, kind="stable")
    merged, kept = np.sort(order[: 2 * d - width]), np.sort(order[2 * d - width :])
    return np.hstack([(za[:, merged] + zb[:, perm[merged]]) / 2, za[:, kept], zb[:, perm[kept]]])


def pleas_merge(
    a: MLPStack, b: MLPStack, x: np.ndarray, budget: float = 1.0, ridge: float = 1e-4
) -> MLPStack:
    """Merge two same-architecture stacks from any initialisations into one whose hidden
    layers have ``merged_width(d, budget)`` units, fitted on unlabelled ``x`` ``[n, in]``."""
    a.check_same_shape(b)
    if not 1.0 <= budget <= 2.0:
        raise ConfigError(f"PLeaS budget must lie in [1, 2] (width factor), got {budget}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != a.weights[0].shape[1]:
        raise IncompatibleError(
            f"PLeaS data must be [n>0, {a.weights[0].shape[1]}] inputs, got {list(x.shape)}"
        )
    perms, scores = match_layers(a, b, x)
    za_all, zb_all = a.preactivations(x), b.preactivations(x)
    weights, biases = [], []
    h = x
    for layer, (za, zb) in enumerate(zip(za_all, zb_all, strict=True)):
        if layer < len(perms):
            width = merged_width(za.shape[1], budget)
            y = _layer_targets(za, zb, perms[layer], scores[layer], width)
        else:
            y = (za + zb) / 2
        wb = least_squares(h, y, ridge)
        weights.append(wb[:, :-1])
        biases.append(wb[:, -1])
        h = np.maximum(h @ weights[-1].T + biases[-1], 0.0)
    return MLPStack(tuple(weights), tuple(biases))
