"""A feed-forward stack: ``z_l = h_{l-1} W_lᵀ + b_l``, ``h_l = relu(z_l)`` for hidden layers,
logits ``z_L`` from the last; the model family PLeaS merges here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taskvec.errors import IncompatibleError


@dataclass(frozen=True)
class MLPStack:
    """Weights ``[out, in]`` and biases ``[out]`` per layer, in order (float64)."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.biases) or not self.weights:
            raise IncompatibleError("MLP stack needs one bias per weight and at least one layer")
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise IncompatibleError(f"MLP layer {i}: weight {w.shape} and bias {b.shape}")
            if i and w.shape[1] != self.weights[i - 1].shape[0]:
                raise IncompatibleError(
                    f"MLP layers {i - 1} and {i} do not chain: "
                    f"{self.weights[i - 1].shape[0]} outputs feed {w.shape[1]} inputs"
                )

    @property
    def widths(self) -> tuple[int, ...]:
        """Output width of each layer."""
        return tuple(w.shape[0] for w in self.weights)

    @property
    def n_params(self) -> int:
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def preactivations(self, x: np.ndarray) -> list[np.ndarray]:
        """``[z_1, …, z_L]`` for inputs ``x`` ``[n, in]``."""
        zs: list[np.ndarray] = []
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = h @ w.T + b
            zs.append(z)
            if i < len(self.weights) - 1:
                h = np.maximum(z, 0.0)
        return zs

    def hidden(self, x: np.ndarray) -> list[np.ndarray]:
        """Post-activation outputs ``h_l`` of the hidden layers."""
        return [np.maximum(z, 0.0) for z in self.preactivations(x)[:-1]]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.preactivations(x)[-1]

    def permuted(self, perms: list[np.ndarray]) -> MLPStack:
        """The same function with hidden layer ``l``'s units reordered to ``perms[l]``
        (new unit ``i`` is old unit ``perms[l][i]``)."""
        ws, bs = list(self.weights), list(self.biases)
        for layer, p in enumerate(perms):
            ws[layer], bs[layer] = ws[layer][p], bs[layer][p]
            ws[layer + 1] = ws[layer + 1][:, p]
        return MLPStack(tuple(ws), tuple(bs))

    def check_same_shape(self, other: MLPStack) -> None:
        """Refuse two stacks of different architecture, in one line."""
        if [w.shape for w in self.weights] != [w.shape for w in other.weights]:
            raise IncompatibleError(
                "models differ in architecture: layer shapes "
                f"{[w.shape for w in self.weights]} vs {[w.shape for w in other.weights]}"
            )
