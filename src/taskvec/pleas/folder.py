"""The on-disk form of an MLP stack, for ``merge_method: pleas`` / ``permute``: a folder with
``model.safetensors`` holding ``layers.<i>.weight`` ``[out, in]`` and ``layers.<i>.bias``
``[out]`` for ``i = 0 … L−1`` (ReLU between layers, none after the last) and ``mlp.json``
``{"format": "taskvec-mlp", "activation": "relu", "layers": L}``. Unlabelled data for the
merge is a ``.npy`` array ``[n, in]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from taskvec.errors import CheckpointError, ConfigError, IncompatibleError
from taskvec.io.writer import CheckpointWriter, PlannedTensor
from taskvec.pleas.stack import MLPStack

FORMAT = {"format": "taskvec-mlp", "activation": "relu"}


def stack_shapes(folder: str | Path) -> list[tuple[int, int]]:
    """Each layer's weight shape, from ``mlp.json`` and the safetensors header only; one line
    if the folder is not an MLP stack or its layers do not chain."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / "mlp.json").read_text())
        n = int(spec["layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: not an MLP stack folder (mlp.json: {e})") from None
    if {k: spec.get(k) for k in FORMAT} != FORMAT or n < 1:
        raise CheckpointError(f"{folder}: mlp.json must be {FORMAT} with layers >= 1")
    try:
        with safe_open(folder / "model.safetensors", "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # a missing or malformed file: safetensors raises several kinds
        raise CheckpointError(f"{folder}: cannot read model.safetensors ({e})") from None
    want = {f"layers.{i}.{p}" for i in range(n) for p in ("weight", "bias")}
    if set(shapes) != want:
        raise CheckpointError(f"{folder}: model.safetensors must hold exactly {sorted(want)}")
    out = []
    for i in range(n):
        w, b = shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"]
        if len(w) != 2 or b != (w[0],):
            raise CheckpointError(f"{folder}: layer {i} weight {w} and bias {b} do not match")
        if out and w[1] != out[-1][0]:
            raise IncompatibleError(
                f"{folder}: layers {i - 1} and {i} do not chain ({out[-1][0]} outputs, "
                f"{w[1]} inputs)"
            )
        out.append((w[0], w[1]))
    return out


def load_stack(folder: str | Path) -> MLPStack:
    """The stack in float64; one line if a weight is NaN or infinite (the merge would be)."""
    n = len(stack_shapes(folder))
    with safe_open(Path(folder) / "model.safetensors", "pt") as f:
        ws = tuple(f.get_tensor(f"layers.{i}.weight").double().numpy() for i in range(n))
        bs = tuple(f.get_tensor(f"layers.{i}.bias").double().numpy() for i in range(n))
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise CheckpointError(f"{folder}: layer {i} holds NaN or infinite values")
    return MLPStack(ws, bs)


def data_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of a numeric ``.npy`` data file, from its header; one line if it is not one."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ConfigError(f"data {path}: not a readable .npy array ({e})") from None
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"data {path}: a .npy array of numbers is needed, not {array.dtype}")
    return tuple(array.shape)


def load_data(path: str | Path) -> np.ndarray:
    """The data array in float64; one line if it holds NaN or infinite values."""
    x = np.load(path).astype(np.float64)
    if not np.isfinite(x).all():
        raise ConfigError(f"data {path}: holds NaN or infinite values")
    return x


def save_stack(
    stack: MLPStack, out: Path, *, overwrite: bool, producer: dict, dtype: torch.dtype
) -> Path:
    """Write ``stack`` as an MLP stack folder through the atomic checkpoint writer."""
    tensors = {}
    for i, (w, b) in enumerate(zip(stack.weights, stack.biases, strict=True)):
        tensors[f"layers.{i}.weight"] = torch.from_numpy(w).to(dtype)
        tensors[f"layers.{i}.bias"] = torch.from_numpy(b).to(dtype)
    planned = [PlannedTensor(k, tuple(t.shape), dtype) for k, t in tensors.items()]
    with CheckpointWriter(out, planned, overwrite=overwrite, producer=producer) as writer:
        for k, t in tensors.items():
            writer.write(k, t)
        writer.add_json("mlp.json", {**FORMAT, "layers": len(stack.weights)})
        return writer.commit()
