"""Golden tests of the foundation: the API and the CLI against the formulas, on tiny real models.

Expected values are computed here in float64 straight from the in-memory state dicts
(``θ0 + λ Σ wᵢ(θᵢ − θ0)`` and ``Σ wᵢθᵢ / Σ wᵢ``). taskvec computes in float32, so results are
compared elementwise against the float32 rounding bound of the formula (a few ulps of the sum of
the absolute values of its terms), not bitwise: the exact bits depend on the order in which
the terms are accumulated, which the formula does not fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import (
    SHARD_SIZE,
    Family,
    StateDict,
    assert_within,
    formula_bound,
    load_folder,
    run_cli,
)
from safetensors import safe_open

import taskvec as tv
from taskvec.io.writer import parse_size

LAMBDA = 0.6
WEIGHTS = [0.7, -0.3, 0.45]


# --------------------------------------------------------------------------------------------
# Expectations, computed directly with torch in float64
# --------------------------------------------------------------------------------------------


def expected_task_arithmetic(
    fam: Family, weights: list[float], lam: float
) -> tuple[StateDict, StateDict]:
    """``θ0 + λ Σ wᵢ(θᵢ − θ0)`` and its float32 rounding bound, per tensor."""
    ref, bound = {}, {}
    for k, b in fam.base_sd.items():
        b64 = b.double()
        delta = sum(w * (sd[k].double() - b64) for w, sd in zip(weights, fam.ft_sds, strict=False))
        ref[k] = b64 + lam * delta
        mags = [
            abs(lam * w) * (sd[k].abs() + b.abs())
            for w, sd in zip(weights, fam.ft_sds, strict=False)
        ]
        bound[k] = formula_bound(b, *mags)
    return ref, bound


def expected_linear(
    sds: list[StateDict], weights: list[float], normalize: bool
) -> tuple[StateDict, StateDict]:
    """``Σ wᵢθᵢ / Σ wᵢ`` (without the division if not ``normalize``) and its rounding bound."""
    total = sum(weights) if normalize else 1.0
    ref, bound = {}, {}
    for k in sds[0]:
        ref[k] = sum(w * sd[k].double() for w, sd in zip(weights, sds, strict=True)) / total
        mags = [abs(w / total) * sd[k] for w, sd in zip(weights, sds, strict=True)]
        bound[k] = formula_bound(*mags)
    return ref, bound


def check(out: StateDict, ref: StateDict, bound: StateDict) -> None:
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].dtype == torch.float32, k
        assert tuple(out[k].shape) == tuple(ref[k].shape), k
        assert_within(out[k], ref[k], bound[k])


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ta_config(fam: Family, weights: list[float], lam: float) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "models": [
            {"model": str(p), "parameters": {"weight": w}}
            for p, w in zip(fam.fts, weights, strict=False)
        ],
        "parameters": {"lambda": lam},
    }


# --------------------------------------------------------------------------------------------
# task_arithmetic: API and CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_api_task_arithmetic_is_the_formula(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fam: Family = request.getfixturevalue(arch)
    n = len(fam.fts)
    base = tv.load(fam.base)
    taus = [tv.load(p) - base for p in fam.fts]
    merged = base + LAMBDA * sum(w * t for w, t in zip(WEIGHTS[:n], taus, strict=True))
    out = merged.save(tmp_path / "out", shard_size=SHARD_SIZE, progress=False)
    ref, bound = expected_task_arithmetic(fam, WEIGHTS[:n], LAMBDA)
    check(load_folder(out), ref, bound)
    # the lazily evaluated tensors are the ones that were saved
    saved = load_folder(out)
    for k, v in merged.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_cli_merge_task_arithmetic_is_the_formula(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fam: Family = request.getfixturevalue(arch)
    n = len(fam.fts)
    cfg = write_config(tmp_path / "merge.yml", ta_config(fam, WEIGHTS[:n], LAMBDA))
    res = run_cli("merge", cfg, tmp_path / "out", "--shard-size", SHARD_SIZE, "--no-progress")
    assert res.exit_code == 0, res.stderr
    n_tensors = len(fam.base_sd)
    assert res.stdout.strip() == (
        f"merged {n_tensors} tensors with task_arithmetic into {tmp_path / 'out'}"
    )
    ref, bound = expected_task_arithmetic(fam, WEIGHTS[:n], LAMBDA)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_negative_weight_is_unlearning(llama: Family, tmp_path: Path) -> None:
    """A single negative weight subtracts the task vector: θ0 − λ·τ."""
    cfg = ta_config(llama, [-1.0], 0.5)
    tv.merge(cfg, tmp_path / "out", progress=False)
    ref, bound = expected_task_arithmetic(llama, [-1.0], 0.5)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_task_arithmetic_normalize_divides_by_weight_sum(llama: Family, tmp_path: Path) -> None:
    weights = [0.5, 1.5]
    cfg = ta_config(llama, weights, LAMBDA)
    cfg["parameters"]["normalize"] = True
    tv.merge(cfg, tmp_path / "out", progress=False)
    ref, bound = expected_task_arithmetic(llama, [w / 2.0 for w in weights], LAMBDA)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_cli_diff_then_apply_with_scale(llama: Family, tmp_path: Path) -> None:
    vectors = []
    for i, ft in enumerate(llama.fts[:2]):
        out = tmp_path / f"tau{i}"
        res = run_cli("diff", llama.base, ft, out, "--no-progress")
        assert res.exit_code == 0, res.stderr
        assert f"({len(llama.base_sd)} tensors)" in res.stdout
        vectors.append(out)
        # the task vector itself is exactly ft − base, rounded once to float32
        tau = load_folder(out)
        for k, b in llama.base_sd.items():
            assert torch.equal(tau[k], llama.ft_sds[i][k] - b), k
        assert json.loads((out / "taskvec.json").read_text())["kind"] == "task_vector"
    res = run_cli(
        "apply",
        llama.base,
        *vectors,
        tmp_path / "applied",  # `taskvec apply BASE TV... OUT --scale`, as the spec writes it
        "--scale",
        "-0.4",
        "--no-progress",
    )
    assert res.exit_code == 0, res.stderr
    ref, bound = expected_task_arithmetic(llama, [1.0, 1.0], -0.4)
    check(load_folder(tmp_path / "applied"), ref, bound)
    # -o OUT is the same thing
    res = run_cli(
        "apply", llama.base, *vectors, "-o", tmp_path / "o", "--scale", "-0.4", "--no-progress"
    )
    assert res.exit_code == 0, res.stderr
    assert load_folder(tmp_path / "o").keys() == load_folder(tmp_path / "applied").keys()
    for k, v in load_folder(tmp_path / "o").items():
        assert torch.equal(v, load_folder(tmp_path / "applied")[k]), k


# --------------------------------------------------------------------------------------------
# linear (weighted average)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_cli_merge_linear(llama: Family, tmp_path: Path, normalize: bool) -> None:
    weights = [1.0, 2.0, 0.5]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(p), "parameters": {"weight": w}}
            for p, w in zip(llama.fts, weights, strict=True)
        ],
        "parameters": {"normalize": normalize},
        "dtype": "float32",
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    ref, bound = expected_linear(llama.ft_sds, weights, normalize)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_linear_normalize_defaults_to_true(bert: Family, tmp_path: Path) -> None:
    weights = [3.0, 1.0]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(p), "parameters": {"weight": w}}
            for p, w in zip(bert.fts, weights, strict=True)
        ],
    }
    tv.merge(cfg, tmp_path / "out", progress=False)
    ref, bound = expected_linear(bert.ft_sds, weights, True)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_api_model_soup_is_the_weighted_average(llama: Family, tmp_path: Path) -> None:
    m = [tv.load(p) for p in llama.fts]
    soup = 0.5 * m[0] + 0.25 * m[1] + 0.25 * m[2]
    assert isinstance(soup, tv.Model)
    ref, bound = expected_linear(llama.ft_sds, [0.5, 0.25, 0.25], True)
    check(load_folder(soup.save(tmp_path / "soup", progress=False)), ref, bound)
    even = (m[0] + m[1] + m[2]) / 3
    assert isinstance(even, tv.Model)
    ref, bound = expected_linear(llama.ft_sds, [1.0, 1.0, 1.0], True)
    check(even.state_dict(), ref, bound)


def test_api_and_cli_agree_with_each_other(bert: Family, tmp_path: Path) -> None:
    """Both paths compute the same formula; they may differ by float32 rounding only."""
    cfg = ta_config(bert, WEIGHTS[:2], LAMBDA)
    tv.merge(cfg, tmp_path / "cli", progress=False)
    base = tv.load(bert.base)
    api = base + LAMBDA * (
        WEIGHTS[0] * (tv.load(bert.fts[0]) - base) + WEIGHTS[1] * (tv.load(bert.fts[1]) - base)
    )
    _, bound = expected_task_arithmetic(bert, WEIGHTS[:2], LAMBDA)
    cli_out = load_folder(tmp_path / "cli")
    for k, v in api.state_dict().items():
        assert_within(v, cli_out[k], 2 * bound[k])


# --------------------------------------------------------------------------------------------
# Output folder: sharding, index, dtype, side files, loads with transformers
# --------------------------------------------------------------------------------------------


def _shards_respect(folder: Path, shard_size: int) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    assert files == sorted(p.name for p in folder.glob("*.safetensors"))
    total = 0
    for fn in files:
        with safe_open(str(folder / fn), "pt") as f:
            names = list(f.keys())
            sizes = [f.get_slice(n).get_shape() for n in names]
            dtypes = {f.get_slice(n).get_dtype() for n in names}
        nbytes = []
        for n, shape in zip(names, sizes, strict=True):
            size = {"F32": 4, "BF16": 2, "F16": 2}[f"{next(iter(dtypes))}"]
            for d in shape:
                size *= d
            nbytes.append(size)
            assert index["weight_map"][n] == fn
        # a shard holds at most shard_size bytes of tensor data, unless one tensor is larger
        assert sum(nbytes) <= shard_size or len(names) == 1, (fn, sum(nbytes))
        total += sum(nbytes)
    assert index["metadata"]["total_size"] == total
    return files


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_save_shards_dtype_and_index(llama: Family, tmp_path: Path, dtype: str) -> None:
    base = tv.load(llama.base)
    merged = base + 0.5 * (tv.load(llama.fts[0]) - base)
    out = merged.save(tmp_path / "out", dtype=dtype, shard_size="16KB", progress=False)
    _shards_respect(out, parse_size("16KB"))
    got = load_folder(out)
    want_dtype = getattr(torch, dtype)
    ref32 = merged.state_dict()
    for k, v in got.items():
        assert v.dtype == want_dtype
        assert torch.equal(v, ref32[k].to(want_dtype)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == dtype


def test_cli_merge_shard_size_and_out_dtype(llama: Family, tmp_path: Path) -> None:
    cfg = ta_config(llama, WEIGHTS, LAMBDA)
    cfg["out_dtype"] = "bfloat16"
    res = run_cli(
        "merge",
        write_config(tmp_path / "c.yml", cfg),
        tmp_path / "out",
        "--shard-size",
        "20KB",
        "--no-progress",
    )
    assert res.exit_code == 0, res.stderr
    _shards_respect(tmp_path / "out", parse_size("20KB"))
    got = load_folder(tmp_path / "out")
    ref, bound = expected_task_arithmetic(llama, WEIGHTS, LAMBDA)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        # one bfloat16 rounding of a float32 value within the bound
        assert_within(v, ref[k], bound[k] + ref[k].abs() * 2.0**-8)


def test_side_files_are_copied(llama: Family, tmp_path: Path) -> None:
    tv.merge(ta_config(llama, WEIGHTS, LAMBDA), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (llama.base / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (llama.base / "config.json").read_text()
    )
    api_out = (tv.load(llama.base) + 0.1 * (tv.load(llama.fts[0]) - tv.load(llama.base))).save(
        tmp_path / "api", progress=False
    )
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (api_out / name).read_bytes() == (llama.base / name).read_bytes(), name


def _forward(model: Any, arch: str) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 13, 17, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if arch == "llama" else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merged_folder_loads_with_transformers(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    fam: Family = request.getfixturevalue(arch)
    n = len(fam.fts)
    res = run_cli(
        "merge",
        write_config(tmp_path / "c.yml", ta_config(fam, WEIGHTS[:n], LAMBDA)),
        tmp_path / "out",
        "--shard-size",
        SHARD_SIZE,
        "--no-progress",
    )
    assert res.exit_code == 0, res.stderr
    auto = AutoModelForCausalLM if arch == "llama" else AutoModel
    merged = auto.from_pretrained(tmp_path / "out").eval()
    got = _forward(merged, arch)
    assert torch.isfinite(got).all()
    # the same architecture with the expected weights loaded by hand gives the same output
    ref, _ = expected_task_arithmetic(fam, WEIGHTS[:n], LAMBDA)
    expect_model = auto.from_pretrained(fam.base).eval()
    missing, unexpected = expect_model.load_state_dict(
        {k: v.float() for k, v in ref.items()}, strict=False
    )
    assert not unexpected
    assert not [k for k in missing if k in fam.base_sd]
    torch.testing.assert_close(got, _forward(expect_model, arch), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# info, and the tensor count of the merge message
# --------------------------------------------------------------------------------------------


def test_cli_info_model_and_task_vector(llama: Family, tmp_path: Path) -> None:
    res = run_cli("info", llama.base, "--tensors")
    assert res.exit_code == 0, res.stderr
    n_files = len(list(llama.base.glob("*.safetensors")))
    params = sum(v.numel() for v in llama.base_sd.values())
    assert f"{llama.base}: model" in res.stdout
    assert f"tensors:    {len(llama.base_sd)} in {n_files} file(s)" in res.stdout
    assert f"parameters: {params:,}" in res.stdout
    assert f"float32 ×{len(llama.base_sd)}" in res.stdout
    assert "LlamaForCausalLM" in res.stdout
    for name, t in llama.base_sd.items():
        assert f"  {name}  {list(t.shape)}  float32" in res.stdout
    (tv.load(llama.fts[0]) - tv.load(llama.base)).save(tmp_path / "tau", progress=False)
    res = run_cli("info", tmp_path / "tau")
    assert res.exit_code == 0, res.stderr
    assert f"{tmp_path / 'tau'}: task vector" in res.stdout
    assert "base fingerprint" in res.stdout


def test_merge_message_counts_tensors_not_row_chunks(
    llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors are computed in row chunks; the message counts output tensors, and the
    chunked result is bitwise the unchunked one."""
    cfg = write_config(tmp_path / "c.yml", ta_config(llama, WEIGHTS, LAMBDA))
    assert run_cli("merge", cfg, tmp_path / "whole", "--no-progress").exit_code == 0
    monkeypatch.setattr("taskvec.engine.CHUNK_ELEMENTS", 256)
    res = run_cli("merge", cfg, tmp_path / "chunked", "--no-progress")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith(f"merged {len(llama.base_sd)} tensors "), res.stdout
    whole, chunked = load_folder(tmp_path / "whole"), load_folder(tmp_path / "chunked")
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k
    # the API's chunked evaluation too
    base = tv.load(llama.base)
    expr = base + LAMBDA * (tv.load(llama.fts[1]) - base)
    chunked_api = load_folder(expr.save(tmp_path / "api", progress=False))
    monkeypatch.undo()
    for k, v in expr.state_dict().items():
        assert torch.equal(v, chunked_api[k]), k


# --------------------------------------------------------------------------------------------
# Per-tensor parameters: filter lists and layer gradients (mergekit's semantics)
# --------------------------------------------------------------------------------------------


def test_filter_lists_and_layer_gradients(llama: Family, tmp_path: Path) -> None:
    """``weight: [{filter: self_attn, value: [0.2, 1.0]}, {value: 0.5}]`` and
    ``lambda: [1.0, 0.5]``: a gradient is interpolated at t = i / (n − 1) for layer i of n,
    tensors outside the layers take t = 0, and the first matching filter wins."""
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [
            {
                "model": str(llama.fts[0]),
                "parameters": {
                    "weight": [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.5}]
                },
            },
            {"model": str(llama.fts[1]), "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": [1.0, 0.5]},
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    got = load_folder(tmp_path / "out")
    for k, b in llama.base_sd.items():
        t = float(k.split(".")[2]) if k.startswith("model.layers.") else 0.0  # 2 layers: t = i
        w0 = 0.2 + 0.8 * t if "self_attn" in k else 0.5
        lam = 1.0 - 0.5 * t
        fam_weights = [w0, 0.3]
        sds = llama.ft_sds[:2]
        want = b.double() + lam * sum(
            w * (sd[k].double() - b.double()) for w, sd in zip(fam_weights, sds, strict=True)
        )
        bound = formula_bound(
            b,
            *[
                abs(lam * w) * (sd[k].abs() + b.abs())
                for w, sd in zip(fam_weights, sds, strict=True)
            ],
        )
        assert_within(got[k], want, bound)


def test_relative_model_paths_resolve_against_the_config(
    bert: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": bert.base.name,
        "models": [{"model": p.name, "parameters": {"weight": 1.0}} for p in bert.fts],
    }
    path = write_config(bert.root / "relative.yml", cfg)
    monkeypatch.chdir(tmp_path)  # not the config's folder
    res = run_cli("merge", path, "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    ref, bound = expected_task_arithmetic(bert, [1.0, 1.0], 1.0)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_tokenizer_source_names_another_model(llama: Family, tmp_path: Path) -> None:
    import shutil

    donor = tmp_path / "donor"
    shutil.copytree(llama.fts[1], donor)
    (donor / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    cfg = ta_config(llama, WEIGHTS[:2], LAMBDA)
    cfg["models"][1]["model"] = str(donor)
    cfg["tokenizer_source"] = str(donor)
    tv.merge(cfg, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 7}'
    assert (out / "generation_config.json").read_bytes() == (
        llama.base / "generation_config.json"
    ).read_bytes()


@pytest.mark.parametrize("layout, files", [("bin-base", 3), ("pt-base", 1), ("st-base", 1)])
def test_cli_info_other_layouts(bert: Family, layout: str, files: int) -> None:
    res = run_cli("info", bert.extra[layout])
    assert res.exit_code == 0, res.stderr
    assert f"tensors:    {len(bert.base_sd)} in {files} file(s)" in res.stdout
    assert f"parameters: {sum(v.numel() for v in bert.base_sd.values()):,}" in res.stdout
    assert ": model" in res.stdout.splitlines()[0]


# --------------------------------------------------------------------------------------------
# slices
# --------------------------------------------------------------------------------------------


def test_passthrough_slices_stack_layers(llama: Family, tmp_path: Path) -> None:
    """Layers 0–1 of the base then layer 1 of a fine-tune: 3 layers; tensors before the layers
    (embeddings) come from the first slice, those after (final norm, head) from the last."""
    from transformers import AutoModelForCausalLM

    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llama.base), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(llama.fts[0]), "layer_range": [1, 2]}]},
        ],
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    out = load_folder(tmp_path / "out")
    ft = llama.ft_sds[0]
    want = {k: v for k, v in llama.base_sd.items() if k.startswith("model.layers.")}
    want |= {k.replace("layers.1.", "layers.2."): ft[k] for k in ft if "layers.1." in k}
    want |= {"model.embed_tokens.weight": llama.base_sd["model.embed_tokens.weight"]}
    want |= {k: ft[k] for k in ("model.norm.weight", "lm_head.weight")}
    assert set(out) == set(want)
    for k, v in want.items():
        assert torch.equal(out[k], v), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(torch.tensor([[3, 1, 4, 1, 5]])).logits
    assert logits.shape == (1, 5, 64) and torch.isfinite(logits).all()


def test_task_arithmetic_over_slices(llama: Family, tmp_path: Path) -> None:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "slices": [
            {
                "sources": [
                    {"model": str(llama.base), "layer_range": [0, 2]},
                    {
                        "model": str(llama.fts[0]),
                        "layer_range": [0, 2],
                        "parameters": {"weight": WEIGHTS[0]},
                    },
                    {
                        "model": str(llama.fts[1]),
                        "layer_range": [0, 2],
                        "parameters": {"weight": WEIGHTS[1]},
                    },
                ]
            }
        ],
        "parameters": {"lambda": LAMBDA},
    }
    tv.merge(cfg, tmp_path / "out", progress=False)
    ref, bound = expected_task_arithmetic(llama, WEIGHTS[:2], LAMBDA)
    check(load_folder(tmp_path / "out"), ref, bound)


def test_mergekit_yaml_with_empty_parameters(bert: Family, tmp_path: Path) -> None:
    """mergekit configs often list the base with ``parameters:`` left empty (null)."""
    text = f"""\
merge_method: task_arithmetic
base_model: {bert.base}
models:
  - model: {bert.base}
    parameters:
  - model: {bert.fts[0]}
    parameters:
      weight: 0.7
  - model: {bert.fts[1]}
    parameters:
      weight: -0.3
parameters:
  lambda: {LAMBDA}
dtype: float32
"""
    (tmp_path / "c.yml").write_text(text)
    res = run_cli("merge", tmp_path / "c.yml", tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    ref, bound = expected_task_arithmetic(bert, [0.7, -0.3], LAMBDA)
    check(load_folder(tmp_path / "out"), ref, bound)
