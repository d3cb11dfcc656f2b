"""End-to-end smoke test of the lead path: config merge → HF folder → transformers forward."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import taskvec as tv


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_task_arithmetic_config_matches_formula(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "layers.0.w": torch.randn(6, 4, generator=g),
        "layers.1.w": torch.randn(6, 4, generator=g),
    }
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    b = _write(tmp_path / "base", base)
    paths = [_write(tmp_path / f"ft{i}", sd) for i, sd in enumerate(fts)]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(b),
        "models": [
            {"model": str(paths[0]), "parameters": {"weight": 0.7}},
            {"model": str(paths[1]), "parameters": {"weight": -0.2}},
        ],
        "parameters": {"lambda": 0.5},
    }
    tv.merge(cfg, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in base.items():
        want = v + 0.5 * (0.7 * (fts[0][k] - v) - 0.2 * (fts[1][k] - v))
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6)

    api = tv.load(b) + 0.5 * (
        0.7 * (tv.load(paths[0]) - tv.load(b)) - 0.2 * (tv.load(paths[1]) - tv.load(b))
    )
    for k, v in api.state_dict().items():
        torch.testing.assert_close(v, out[k], rtol=1e-6, atol=1e-6)
