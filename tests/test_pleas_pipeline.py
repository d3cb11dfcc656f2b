"""``merge_method: pleas`` / ``permute`` through the CLI: MLP stack folders written here with
safetensors directly, no base model, data as .npy; bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, tree_digest
from safetensors.torch import load_file, save_file
from test_foundation_errors import one_error_line

SIZES = [6, 10, 4]


def write_mlp(folder: Path, seed: int, sizes: list[int] = SIZES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    tensors, arrays = {}, []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w, b = rng.normal(size=(n_out, n_in)).astype(np.float32), rng.normal(size=n_out)
        tensors[f"layers.{i}.weight"] = torch.from_numpy(w)
        tensors[f"layers.{i}.bias"] = torch.from_numpy(b.astype(np.float32))
        arrays += [w, b.astype(np.float32)]
    save_file(tensors, folder / "model.safetensors")
    spec = {"format": "taskvec-mlp", "activation": "relu", "layers": len(sizes) - 1}
    (folder / "mlp.json").write_text(json.dumps(spec))
    return arrays


def forward(tensors: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    n = len(tensors) // 2
    h = x
    for i in range(n):
        h = h @ tensors[f"layers.{i}.weight"].double().numpy().T
        h = h + tensors[f"layers.{i}.bias"].double().numpy()
        h = np.maximum(h, 0) if i < n - 1 else h
    return h


def config(tmp_path: Path, method: str, models: list[Path], **extra: object) -> Path:
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(9).normal(size=(200, SIZES[0])))
    cfg = {
        "merge_method": method,
        "models": [{"model": str(m), "data": str(data)} for m in models],
        **extra,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_permuted(src: dict[str, torch.Tensor], folder: Path, seed: int) -> None:
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(SIZES[1]))
    folder.mkdir()
    permuted = {
        "layers.0.weight": src["layers.0.weight"][perm],
        "layers.0.bias": src["layers.0.bias"][perm],
        "layers.1.weight": src["layers.1.weight"][:, perm],
        "layers.1.bias": src["layers.1.bias"],
    }
    save_file({k: v.contiguous() for k, v in permuted.items()}, folder / "model.safetensors")
    spec = {"format": "taskvec-mlp", "activation": "relu", "layers": 2}
    (folder / "mlp.json").write_text(json.dumps(spec))


def test_permuted_copies_merge_to_the_same_function_through_the_cli(tmp_path: Path) -> None:
    write_mlp(tmp_path / "a", 0)
    src = load_file(tmp_path / "a" / "model.safetensors")
    write_permuted(src, tmp_path / "b", 1)
    write_permuted(src, tmp_path / "c", 2)
    models = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    x = np.random.default_rng(3).normal(size=(30, SIZES[0]))
    for method, params in (("pleas", {"ridge": 0.0}), ("permute", {})):
        cfg = config(tmp_path, method, models, parameters=params)
        dry = run_cli("merge", cfg, tmp_path / method, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert not (tmp_path / method).exists()
        res = run_cli("merge", cfg, tmp_path / method, "--no-progress")
        assert res.exit_code == 0, res.output
        out = load_file(tmp_path / method / "model.safetensors")
        assert out["layers.0.weight"].shape == (SIZES[1], SIZES[0])
        np.testing.assert_allclose(forward(out, x), forward(src, x), atol=1e-4)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("architecture", "differ in architecture"),
        ("base", "uses no base model"),
        ("no-data", "needs `data:`"),
        ("budget", "budget"),
        ("data-width", "not [n>0, 6]"),
        ("three-wide", "exactly two models"),
        ("data-nan", "NaN or infinite"),
        ("data-text", "array of numbers"),
        ("weight-nan", "NaN or infinite"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, case: str, needle: str) -> None:
    write_mlp(tmp_path / "a", 0)
    write_mlp(tmp_path / "b", 1, [6, 9, 4] if case == "architecture" else SIZES)
    models = [tmp_path / "a", tmp_path / "b"]
    extra: dict[str, object] = {}
    if case == "three-wide":
        write_mlp(tmp_path / "c", 2)
        models.append(tmp_path / "c")
        extra["parameters"] = {"budget": 1.5}
    if case == "base":
        extra["base_model"] = str(tmp_path / "a")
    if case == "budget":
        extra["parameters"] = {"budget": 2.5}
    path = config(tmp_path, "pleas", models, **extra)
    cfg = yaml.safe_load(path.read_text())
    if case == "no-data":
        del cfg["models"][0]["data"]
    if case == "data-width":
        np.save(tmp_path / "x.npy", np.zeros((5, 7)))
    if case == "data-nan":
        np.save(tmp_path / "x.npy", np.full((5, SIZES[0]), np.nan))
    if case == "data-text":
        np.save(tmp_path / "x.npy", np.full((5, SIZES[0]), "a"))
    if case == "weight-nan":
        weights = load_file(tmp_path / "b" / "model.safetensors")
        weights["layers.1.bias"][0] = float("nan")
        save_file(weights, tmp_path / "b" / "model.safetensors")
    path.write_text(yaml.safe_dump(cfg))
    before = tree_digest(tmp_path)
    res = run_cli("merge", path, tmp_path / "out", "--no-progress")
    one_error_line(res, needle)
    assert not (tmp_path / "out").exists()
    assert tree_digest(tmp_path) == before
