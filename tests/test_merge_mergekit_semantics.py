"""Config semantics taskvec shares with mergekit 0.1.5, checked without mergekit (the parity
suite, tests/test_mergekit_parity.py, checks the same cases against mergekit itself):

* a ``base_model`` that ``models`` does not list is one more input of a method without a base
  role (linear, karcher);
* a gradient in a one-layer slice is read at t = 1;
* task_arithmetic accepts and ignores ``density`` and ``rescale``;
* a tensor the base has and the experts lack (a non-float buffer) is copied from the base.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.errors import IncompatibleError
from taskvec.layout import LayerLayout
from taskvec.merge import merge, plan_merge


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture
def family(tmp_path: Path) -> dict[str, object]:
    """base and two fine-tunes of a 3-layer toy model; only the base has ``pos.ids`` (int64)."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(4, 3, generator=g) for i in range(3)}
    base["head.w"] = torch.randn(2, 3, generator=g)
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in "ab"]
    paths = {
        "base": _write(tmp_path / "base", {**base, "pos.ids": torch.arange(5)[None]}),
        "ft0": _write(tmp_path / "ft0", fts[0]),
        "ft1": _write(tmp_path / "ft1", fts[1]),
    }
    return {"paths": paths, "base": base, "fts": fts, "tmp": tmp_path}


def _run(family: dict[str, object], cfg: dict[str, object], name: str) -> dict[str, torch.Tensor]:
    out = family["tmp"] / name  # type: ignore[operator]
    merge(cfg, out, progress=False)
    return load_file(str(out / "model.safetensors"))


def test_relative_position_of_a_one_layer_slice_is_one() -> None:
    layout = LayerLayout("layers.", 4)
    assert layout.relative_position(3, 3, 1) == 1.0
    assert layout.relative_position(None, 0, 1) == 0.0
    assert layout.relative_position(None, 0, 4) == 0.0
    assert layout.relative_position(2, 0, 3) == 1.0
    assert layout.relative_position(1, 0, 3) == 0.5


def test_gradient_in_a_one_layer_slice_takes_its_last_value(family) -> None:
    p, base, fts = family["paths"], family["base"], family["fts"]
    src = [
        {"model": p["base"], "layer_range": [2, 3]},
        {"model": p["ft0"], "layer_range": [2, 3], "parameters": {"weight": [0.7, 0.2]}},
    ]
    cfg = {"merge_method": "task_arithmetic", "base_model": p["base"], "slices": [{"sources": src}]}
    out = _run(family, cfg, "out")
    want = base["layers.2.w"] + 0.2 * (fts[0]["layers.2.w"] - base["layers.2.w"])
    torch.testing.assert_close(out["layers.0.w"], want)


@pytest.mark.parametrize("listed", [False, True])
def test_linear_averages_an_unlisted_base_model_in(family, listed: bool) -> None:
    """θ = (w₁θ₁ + w₂θ₂ + w θ₀)/(w₁ + w₂ + w), w the top-level weight; a base listed under
    `models` is averaged once, with its own weight."""
    p, base, fts = family["paths"], family["base"], family["fts"]
    models = [{"model": p["ft0"], "parameters": {"weight": 2.0}}, {"model": p["ft1"]}]
    if listed:
        models.append({"model": p["base"], "parameters": {"weight": 3.0}})
    cfg = {
        "merge_method": "linear",
        "base_model": p["base"],
        "models": models,
        "parameters": {"weight": 1.0},
    }
    out = _run(family, cfg, "out")
    wb = 3.0 if listed else 1.0
    for k, v in base.items():
        want = (2.0 * fts[0][k] + fts[1][k] + wb * v) / (3.0 + wb)
        torch.testing.assert_close(out[k], want)
    assert torch.equal(out["pos.ids"], torch.arange(5)[None])


def test_linear_without_a_weight_for_the_unlisted_base_is_an_error(family) -> None:
    p = family["paths"]
    cfg = {
        "merge_method": "linear",
        "base_model": p["base"],
        "models": [{"model": p[f"ft{i}"], "parameters": {"weight": 1.0}} for i in range(2)],
    }
    plan = plan_merge(cfg)
    assert plan.problems and "weight" in plan.problems[0]


def test_karcher_takes_an_unlisted_base_model_as_a_third_input(family) -> None:
    p, base, fts = family["paths"], family["base"], family["fts"]
    cfg = {"merge_method": "karcher", "base_model": p["base"], "models": [{"model": p["ft0"]}]}
    out = _run(family, cfg, "out")
    cfg3 = {
        "merge_method": "karcher",
        "models": [{"model": p["ft0"]}, {"model": p["base"]}],
    }
    out3 = _run(family, cfg3, "out3")
    for k in base:
        torch.testing.assert_close(out[k], out3[k])
        # two inputs at equal weight: the norm is their mean norm, the direction between
        n = (fts[0][k].norm() + base[k].norm()) / 2
        torch.testing.assert_close(out[k].norm(), n, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[k], fts[0][k])


def test_task_arithmetic_accepts_and_ignores_density_and_rescale(family) -> None:
    p, base, fts = family["paths"], family["base"], family["fts"]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": p["base"],
        "models": [
            {"model": p["ft0"], "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": p["ft1"], "parameters": {"weight": 0.5}},
        ],
        "parameters": {"rescale": True, "density": 0.5},
    }
    out = _run(family, cfg, "out")
    for k, v in base.items():
        want = v + (fts[0][k] - v) + 0.5 * (fts[1][k] - v)
        torch.testing.assert_close(out[k], want)


def test_buffer_missing_from_the_experts_is_copied_from_the_base(family, caplog) -> None:
    p = family["paths"]
    cfg = {
        "merge_method": "ties",
        "base_model": p["base"],
        "models": [{"model": p[f"ft{i}"], "parameters": {"weight": 1.0}} for i in range(2)],
        "parameters": {"density": 0.5},
    }
    with caplog.at_level(logging.INFO, logger="taskvec"):
        out = _run(family, cfg, "out")
    assert torch.equal(out["pos.ids"], torch.arange(5)[None])
    assert out["pos.ids"].dtype == torch.int64
    logged = [r.getMessage() for r in caplog.records if "pos.ids" in r.getMessage()]
    assert len(logged) == 1 and "copied from the base" in logged[0]


def test_float_tensor_missing_from_every_expert_is_copied_from_the_base(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(3, 3, generator=g), "extra": torch.randn(4, generator=g)}
    b = _write(tmp_path / "b", base)
    fts = [_write(tmp_path / f"f{i}", {"a": base["a"] + i + 1.0}) for i in range(2)]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": b,
        "models": [{"model": f, "parameters": {"weight": 0.5}} for f in fts],
        "dtype": "float16",
    }
    merge(cfg, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(out["extra"], base["extra"].half())  # in the output dtype
    torch.testing.assert_close(out["a"], (base["a"] + 1.5).half())


def test_float_tensor_missing_from_some_experts_is_an_error(tmp_path: Path) -> None:
    base = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    b = _write(tmp_path / "b", base)
    f0 = _write(tmp_path / "f0", {"a": torch.ones(2, 2), "b": torch.ones(3)})
    f1 = _write(tmp_path / "f1", {"a": torch.ones(2, 2)})
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": b,
        "models": [{"model": f, "parameters": {"weight": 1.0}} for f in (f0, f1)],
    }
    plan = plan_merge(cfg)
    assert any("has no tensor 'b'" in m for m in plan.problems)
    with pytest.raises(IncompatibleError):
        merge(cfg, tmp_path / "out", progress=False)


def test_buffer_without_a_base_role_comes_from_an_input_that_has_it(tmp_path: Path) -> None:
    f0 = _write(tmp_path / "f0", {"a": torch.ones(2, 2), "ids": torch.arange(4)})
    f1 = _write(tmp_path / "f1", {"a": 3 * torch.ones(2, 2)})
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f, "parameters": {"weight": 1.0}} for f in (f0, f1)],
    }
    merge(cfg, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert math.isclose(float(out["a"][0, 0]), 2.0)
    assert torch.equal(out["ids"], torch.arange(4))
