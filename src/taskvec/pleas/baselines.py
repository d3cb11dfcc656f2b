"""The comparison points for PLeaS: naive weight averaging, permute-then-average
(Git Re-Basin activation matching), and the output ensemble."""

from __future__ import annotations

import numpy as np

from taskvec.pleas.matching import match_layers
from taskvec.pleas.stack import MLPStack


def naive_average(a: MLPStack, b: MLPStack) -> MLPStack:
    """``(θ_A + θ_B) / 2`` tensor by tensor, ignoring unit order."""
    a.check_same_shape(b)
    return MLPStack(
        tuple((wa + wb) / 2 for wa, wb in zip(a.weights, b.weights, strict=True)),
        tuple((ba + bb) / 2 for ba, bb in zip(a.biases, b.biases, strict=True)),
    )


def permute_average(a: MLPStack, b: MLPStack, x: np.ndarray) -> MLPStack:
    """``(θ_A + π(θ_B)) / 2`` with ``π`` from activation matching on ``x``."""
    perms, _ = match_layers(a, b, x)
    return naive_average(a, b.permuted(perms))


def ensemble_logits(a: MLPStack, b: MLPStack, x: np.ndarray) -> np.ndarray:
    """``(f_A(x) + f_B(x)) / 2``: twice the size and compute, the usual upper reference."""
    return (a(x) + b(x)) / 2
