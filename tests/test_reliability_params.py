"""Invalid parameters, dtypes and inputs give one line on stderr, never a silent wrong merge or
a traceback: declared parameter ranges (checked before any tensor is read, dry runs included),
required globals, empty gradients, integer output dtypes, float8 checkpoints, a corrupt
``__metadata__`` and a closed pipe."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Family, load_folder, run_cli, tree_digest
from safetensors.torch import save_file
from test_foundation_errors import Check, one_error_line, write_config

from taskvec.algebra import load_model
from taskvec.errors import ConfigError
from taskvec.io.checkpoint import Checkpoint
from taskvec.merge import merge, plan_merge
from taskvec.methods import all_methods, merge_method
from taskvec.methods.params import Param
from taskvec.methods.reference import method_reference


def _merge(method: str, base: Path, fts: list[Path], **params: Any) -> dict[str, Any]:
    """``method`` over ``base`` and ``fts`` (weight 1 each if it takes weights), top-level
    ``params``."""
    weight = {"weight": 1.0} if "weight" in all_methods()[method].per_model else {}
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": dict(weight)} for p in fts],
        "parameters": params,
    }


def _config(fam: Family, method: str, n: int = 2, **params: Any) -> dict[str, Any]:
    """``method`` over the family's base and first ``n`` fine-tunes."""
    return _merge(method, fam.base, fam.fts[:n], **params)


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any tensor read from now on fails the test."""

    def refuse(*_: Any, **__: Any) -> torch.Tensor:
        raise AssertionError("a tensor was read before the parameters were checked")

    monkeypatch.setattr(Checkpoint, "read", refuse)


# --------------------------------------------------------------------------------------------
# Declared parameter ranges
# --------------------------------------------------------------------------------------------

# (method, models, top-level parameters, the words the one line must hold)
BAD_PARAMETERS = [
    ("ties", 2, {"density": -0.2}, ["density = -0.2", "out of range (0, 1]"]),
    ("ties", 2, {"density": float("nan")}, ["density = nan", "(0, 1]"]),
    ("ties", 2, {"density": 1.5}, ["density = 1.5", "(0, 1]"]),
    ("dare_linear", 2, {"density": 0}, ["density = 0", "(0, 1]"]),
    ("consensus", 2, {"k": 3}, ["parameters: k = 3", "[1, N]", "N = 2"]),
    ("consensus", 1, {}, ["k = 2", "N = 1", "the default"]),
    ("consensus", 2, {"k": 1.5}, ["k = 1.5", "whole number"]),
    ("slerp", 1, {"t": 1.5}, ["t = 1.5", "[0, 1]"]),
    ("slerp", 1, {}, ["parameters: missing required parameter 't' of slerp"]),
    ("nearswap", 1, {}, ["missing required parameter 't' of nearswap"]),
    ("nearswap", 1, {"t": 0}, ["t = 0", "(0, inf)"]),
    ("ties", 2, {"trim_scope": "layer"}, ["trim_scope = 'layer'", "'tensor' or 'model'"]),
    ("dare_ties", 2, {"rescale": "l2"}, ["rescale = 'l2'", "'l1' or 'expectation'"]),
    ("task_arithmetic", 2, {"lambda": float("inf")}, ["lambda = inf", "(-inf, inf)"]),
    ("task_arithmetic", 2, {"normalize": 2}, ["normalize = 2", "true or false"]),
    ("wudi", 2, {"steps": 2.5}, ["steps = 2.5", "whole number"]),
]


@pytest.mark.parametrize(("method", "n", "params", "needles"), BAD_PARAMETERS)
def test_out_of_range_parameter_is_one_line_before_any_read(
    llama: Family,
    tmp_path: Path,
    no_leftovers: Check,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    n: int,
    params: dict[str, Any],
    needles: list[str],
) -> None:
    cfg = write_config(tmp_path / "c.yml", _config(llama, method, n, **params))
    _no_reads(monkeypatch)
    out = tmp_path / "out"
    one_error_line(run_cli("merge", cfg, out, "--no-progress"), *needles)
    no_leftovers(out)
    dry = run_cli("merge", cfg, out, "--dry-run")  # a dry run lists it as a problem
    assert dry.exit_code == 1 and "Traceback" not in dry.stderr
    assert "1 problem(s) would stop this merge" in dry.stderr
    assert all(n in dry.stderr for n in needles), dry.stderr
    no_leftovers(out)


def test_per_model_value_names_the_model(llama: Family, tmp_path: Path) -> None:
    cfg = _config(llama, "ties")
    cfg["models"][1]["parameters"]["density"] = -0.2
    line = one_error_line(run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "o"))
    assert line == (
        f"taskvec: error: model {str(llama.fts[1])!r}: density = -0.2 is out of range (0, 1]"
    )


def test_yaml_nan_is_refused(llama: Family, tmp_path: Path) -> None:
    cfg = _config(llama, "ties")
    text = json.dumps(cfg).replace('"parameters": {}', '"parameters": {"density": .nan}')
    res = run_cli("merge", write_config(tmp_path / "c.yml", text), tmp_path / "o")
    one_error_line(res, "density = nan", "(0, 1]")


def test_gradient_value_out_of_range_in_some_layers(llama: Family, tmp_path: Path) -> None:
    """A gradient from 0.5 to -0.5 leaves the range in the upper layers only: still refused."""
    cfg = write_config(tmp_path / "c.yml", _config(llama, "ties", density=[0.5, -0.5]))
    one_error_line(run_cli("merge", cfg, tmp_path / "o"), "density = -0.5", "(0, 1]")


def test_slices_name_the_slice(llama: Family, tmp_path: Path) -> None:
    src = [{"model": str(p), "layer_range": [0, 2]} for p in (llama.base, llama.fts[0])]
    cfg = {
        "merge_method": "slerp",
        "base_model": str(llama.base),
        "slices": [{"sources": src, "parameters": {"t": -1}}],
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "o")
    one_error_line(res, "slices[0]: t = -1", "[0, 1]")


@pytest.mark.parametrize(
    ("method", "n", "params"),
    [
        ("task_arithmetic", 2, {"lambda": -1.0}),  # negation is a feature
        ("ties", 2, {"density": 1.0}),
        ("dare_linear", 2, {"density": 1e-3}),
        ("consensus", 2, {"k": 2}),  # k = N
        ("slerp", 1, {"t": 0}),
        ("slerp", 1, {"t": [0, 1]}),
        ("breadcrumbs", 2, {"gamma": 0}),
        ("wudi", 2, {"steps": 0}),
    ],
)
def test_values_at_the_ends_of_their_ranges_are_accepted(
    llama: Family, method: str, n: int, params: dict[str, Any]
) -> None:
    plan = plan_merge(_config(llama, method, n, **params))
    assert plan.problems == [] and plan.jobs


def test_every_parameter_of_every_method_declares_its_valid_values() -> None:
    reference = method_reference()
    for name, m in all_methods().items():
        assert set(m.params) == {*m.per_model, *m.globals}, name
        section = reference.split(f"## `{name}`")[1].split("\n## ")[0]
        for key, p in m.params.items():
            assert isinstance(p, Param), (name, key)
            assert p.default is m.per_model.get(key, m.globals.get(key)), (name, key)
            if p.kind != "switch" or p.choices:  # the reference says its valid values
                assert f"; {p.describe()})" in section, (name, key)
    assert "`k` (2; a whole number in [1, N])" in reference
    assert "`density` (per model, 1.0; in (0, 1])" in reference


def test_registering_an_undeclared_or_inconsistent_parameter_fails() -> None:
    def fn(tensors: torch.Tensor, base: torch.Tensor, **_: Any) -> torch.Tensor:
        return base

    with pytest.raises(ValueError, match="declare parameter 'alpha'"):
        merge_method("_undeclared", base="required", globals={"alpha": 0.5})(fn)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="its own range"):
        Param(2.0, "[0, 1]")
    with pytest.raises(ValueError, match="malformed range"):
        Param(0.5, "0..1")
    assert "_undeclared" not in all_methods()


# --------------------------------------------------------------------------------------------
# Config values that crashed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight", [[], [{"filter": "mlp", "value": []}, {"value": 1.0}]], ids=["gradient", "filter"]
)
def test_empty_gradient_is_one_line(
    llama: Family, tmp_path: Path, no_leftovers: Check, weight: Any
) -> None:
    cfg = _config(llama, "linear")
    cfg["models"][0]["parameters"]["weight"] = weight
    path = write_config(tmp_path / "c.yml", cfg)
    for dry in ([], ["--dry-run"]):
        res = run_cli("merge", path, tmp_path / "out", *dry)
        one_error_line(res, "models.0.parameters", "'weight' is an empty list")
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Output dtypes: floating point only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "dtype"), [("dtype", "int64"), ("out_dtype", "int32")])
def test_integer_dtype_in_a_merge_config_is_refused(
    llama: Family, tmp_path: Path, no_leftovers: Check, key: str, dtype: str
) -> None:
    cfg = write_config(tmp_path / "c.yml", {**_config(llama, "task_arithmetic"), key: dtype})
    for dry in ([], ["--dry-run"]):
        res = run_cli("merge", cfg, tmp_path / "out", "--no-progress", *dry)
        one_error_line(res, f"dtype {dtype}", "not a floating-point type")
    no_leftovers(tmp_path / "out")


def test_integer_dtype_on_diff_and_apply_is_refused(
    llama: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    tv = tmp_path / "tv"
    res = run_cli("diff", llama.base, llama.fts[0], tv, "--dtype", "int64", "--no-progress")
    one_error_line(res, "dtype int64", "not a floating-point type")
    no_leftovers(tv)
    assert run_cli("diff", llama.base, llama.fts[0], tv, "--no-progress").exit_code == 0
    res = run_cli("apply", llama.base, tv, tmp_path / "o", "--dtype", "int64", "--no-progress")
    one_error_line(res, "dtype int64", "not a floating-point type")
    no_leftovers(tmp_path / "o")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, "int8"])
def test_integer_dtype_in_the_api_is_refused(llama: Family, tmp_path: Path, dtype: Any) -> None:
    model = load_model(llama.fts[0])
    with pytest.raises(ConfigError, match="not a floating-point type"):
        model.save(tmp_path / "o", dtype=dtype, progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="not a floating-point type"):
        (model - load_model(llama.base)).state_dict(dtype=dtype)


def test_fda_refuses_a_dtype_it_would_ignore(llama: Family, tmp_path: Path) -> None:
    cfg = {
        "merge_method": "fda",
        "base_model": str(llama.base),
        "models": [{"model": str(p)} for p in llama.fts[:2]],
        "dtype": "bfloat16",
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "o", "--dry-run")
    one_error_line(res, "fda", "dtype")


# --------------------------------------------------------------------------------------------
# float8 checkpoints
# --------------------------------------------------------------------------------------------


def _as(fam: Family, folder: Path, cast: Callable[[torch.Tensor], torch.Tensor]) -> list[Path]:
    """The family's base and first two fine-tunes with ``cast`` applied to every float tensor,
    as single-file folders with the base's config."""
    out = []
    for tag, sd in [("base", fam.base_sd), ("ft0", fam.ft_sds[0]), ("ft1", fam.ft_sds[1])]:
        d = folder / tag
        d.mkdir(parents=True)
        sd = {k: (cast(v) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_bytes((fam.base / "config.json").read_bytes())
        out.append(d)
    return out


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("method", ["task_arithmetic", "model_stock"])
def test_float8_inputs_merge_like_their_float32_values(
    llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp8: torch.dtype, method: str
) -> None:
    """fp8 inputs are upcast for the methods (model_stock also in two phases over row blocks,
    where the base rows are kept as stored) and the output stays fp8: the result is the merge
    of the same values stored as float32, cast to fp8."""
    monkeypatch.setattr("taskvec.engine.CHUNK_ELEMENTS", 64)  # two phases for model_stock
    base, *fts = _as(llama, tmp_path / "fp8", lambda v: v.to(fp8))
    ref, *ref_fts = _as(llama, tmp_path / "f32", lambda v: v.to(fp8).float())  # same values
    before = tree_digest(tmp_path / "fp8")
    merge(_merge(method, base, fts), tmp_path / "out", progress=False)
    wanted = {**_merge(method, ref, ref_fts), "out_dtype": str(fp8).removeprefix("torch.")}
    merge(wanted, tmp_path / "ref", progress=False)
    got, want = load_folder(tmp_path / "out"), load_folder(tmp_path / "ref")
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == fp8, k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    assert tree_digest(tmp_path / "fp8") == before


def test_float8_diff_apply_and_wider_output(llama: Family, tmp_path: Path) -> None:
    base, ft, _ = _as(llama, tmp_path / "in", lambda v: v.to(torch.float8_e4m3fn))
    tv = tmp_path / "tv"
    assert run_cli("diff", base, ft, tv, "--no-progress", "--dtype", "bf16").exit_code == 0
    res = run_cli("apply", base, tv, tmp_path / "o", "--no-progress", "--dtype", "float32")
    assert res.exit_code == 0, res.stderr
    out, fp8 = load_folder(tmp_path / "o"), load_folder(ft)
    for k, v in out.items():
        assert v.dtype == torch.float32
        # base + (ft − base) in float32 and back through bf16 is ft to bf16 precision
        torch.testing.assert_close(v, fp8[k].float(), rtol=2**-7, atol=2**-12)


# --------------------------------------------------------------------------------------------
# info on a corrupt header, and a closed pipe
# --------------------------------------------------------------------------------------------


def _raw_safetensors(path: Path, metadata: Any) -> Path:
    header = {
        "__metadata__": metadata,
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    return path


@pytest.mark.parametrize("metadata", ["a string", {"format": 1}, [1, 2]])
def test_info_on_a_non_mapping_metadata_is_one_line(tmp_path: Path, metadata: Any) -> None:
    path = _raw_safetensors(tmp_path / "bad.safetensors", metadata)
    one_error_line(run_cli("info", path), str(path), "__metadata__")


def test_info_into_a_closed_pipe_exits_quietly(llama: Family) -> None:
    """``taskvec info ... | head`` with the reader gone before the first write: no error line,
    and no second error when the interpreter flushes stdout at exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskvec.cli", "info", str(llama.base), "--tensors"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has imported torch, let alone written
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert stderr == ""
