"""What a merge or an apply reads is what the user meant, or it is refused (issue 13):

* a saved task vector listed as a merge input stands for ``base + τ`` (every method sees that
  model), and needs a base_model whose content fingerprint is the one τ recorded;
* task vectors record their base's content fingerprint (a hash of the tensor bytes), and
  applying one to another base is refused unless asked for (``allow_other_base``,
  ``--any-base``);
* an input tensor the base lacks, and an index entry whose shard lacks the tensor, are refused
  instead of silently dropped.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Family, assert_within, formula_bound, load_folder, run_cli
from safetensors.torch import load_file, save_file
from test_foundation_errors import Check, one_error_line, write_config

import taskvec as tv
from taskvec.algebra import StoredVector, _fingerprint
from taskvec.errors import CheckpointError, IncompatibleError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.merge import merge, plan_merge


@pytest.fixture(scope="module")
def taus(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """τᵢ = ftᵢ − base of the first two Llama fine-tunes, saved on their own."""
    root = tmp_path_factory.mktemp("taus")
    base = tv.load(llama.base)
    return [
        (tv.load(ft) - base).save(root / f"tau{i}", progress=False)
        for i, ft in enumerate(llama.fts[:2])
    ]


def _materialised(llama: Family, tau: Path, out: Path) -> Path:
    """``base + τ`` saved as a model (float32, as the inputs): what τ stands for."""
    return (tv.load(llama.base) + tv.load(tau)).save(out, progress=False)


# --------------------------------------------------------------------------------------------
# 1. A task vector as a merge input is base + τ
# --------------------------------------------------------------------------------------------


def _configs(fam: Family, a: Path, b: Path) -> dict[str, dict[str, Any]]:
    """Configs over inputs ``a`` and ``b`` (task vectors or the models they stand for) and
    the third fine-tune, with and without a whole-model pass or two phases."""
    base, ft = str(fam.base), str(fam.fts[2])
    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": str(a), "parameters": {"weight": 0.5}},
                {"model": ft, "parameters": {"weight": 0.7}},
            ],
        },
        "linear": {  # the base, not listed, is averaged in as one more model
            "merge_method": "linear",
            "base_model": base,
            "models": [
                {"model": str(a), "parameters": {"weight": 1.0}},
                {"model": str(b), "parameters": {"weight": 2.0}},
            ],
            "parameters": {"weight": 1.0},  # the base's
        },
        "gram_schmidt": {  # a whole-model pass (the Gram matrix of the task vectors)
            "merge_method": "gram_schmidt",
            "base_model": base,
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (a, b)],
        },
        "model_stock": {  # split into row blocks below: two phases
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": str(p)} for p in (a, b, ft)],
        },
        "passthrough": {
            "merge_method": "passthrough",
            "base_model": base,
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
            ],
        },
    }


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "linear", "gram_schmidt", "model_stock", "passthrough"]
)
def test_a_task_vector_input_merges_as_base_plus_tau(
    llama: Family,
    taus: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    models = [_materialised(llama, t, tmp_path / f"model{i}") for i, t in enumerate(taus)]
    if method == "model_stock":
        monkeypatch.setattr("taskvec.engine.CHUNK_ELEMENTS", 64)
    cfg_tau = _configs(llama, *taus)[method]
    cfg_model = _configs(llama, *models)[method]
    if method == "model_stock":
        assert any(t.blocks for t in plan_merge(cfg_tau).tasks)
    if method == "gram_schmidt":
        assert plan_merge(cfg_tau).whole_model_pass
    merge(cfg_tau, tmp_path / "from-tau", progress=False, threads=2)
    merge(cfg_model, tmp_path / "from-model", progress=False, threads=2)
    got, want = load_folder(tmp_path / "from-tau"), load_folder(tmp_path / "from-model")
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:  # the view reads base + τ in float32: the model's very values
        assert torch.equal(got[k], want[k]), k


def test_task_arithmetic_weight_scales_tau(llama: Family, taus: list[Path], tmp_path: Path) -> None:
    """With task_arithmetic ``weight: w``, a task vector input gives base + w·τ."""
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(taus[0]), "parameters": {"weight": 0.3}}],
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    out = load_folder(tmp_path / "out")
    stored = load_folder(taus[0])
    assert out.keys() == llama.base_sd.keys()
    for k, b in llama.base_sd.items():
        tau = stored[k]
        assert torch.count_nonzero(tau) > 0, k
        assert_within(out[k], b.double() + 0.3 * tau.double(), formula_bound(b, tau, tau))


def test_dry_run_reports_the_task_vector(llama: Family, taus: list[Path], tmp_path: Path) -> None:
    cfg = _configs(llama, *taus)["task_arithmetic"]
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert f"model {str(taus[0])!r}: task vector applied to base {str(llama.base)!r}" in res.stdout
    assert "OK: no problems found" in res.stdout
    assert not (tmp_path / "out").exists()
    # the plan's inputs are the files it reads: the task vector and its base, not a view
    read = {str(c.path) for c in plan_merge(cfg).inputs}
    assert {str(taus[0]), str(llama.base), str(llama.fts[2])} == read


def test_a_task_vector_needs_a_base_model(
    llama: Family, taus: list[Path], tmp_path: Path, no_leftovers: Check
) -> None:
    cfg = {"merge_method": "linear", "models": [{"model": str(p)} for p in (taus[0], *llama.fts)]}
    path = write_config(tmp_path / "c.yml", cfg)
    for extra in ([], ["--dry-run"]):
        res = run_cli("merge", path, tmp_path / "out", "--no-progress", *extra)
        one_error_line(res, f"model {str(taus[0])!r} is a task vector", "a base_model is needed")
        no_leftovers(tmp_path / "out")


def test_a_task_vector_as_base_model_is_refused(
    llama: Family, taus: list[Path], tmp_path: Path, no_leftovers: Check
) -> None:
    for method in ("task_arithmetic", "linear"):
        cfg = {
            "merge_method": method,
            "base_model": str(taus[0]),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in llama.fts],
        }
        res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out")
        one_error_line(res, f"base_model {str(taus[0])!r} is a task vector")
        no_leftovers(tmp_path / "out")


def test_a_task_vector_of_another_base_is_refused_in_a_merge(
    llama: Family, taus: list[Path], tmp_path: Path, no_leftovers: Check
) -> None:
    other = llama.fts[1]  # same architecture, other weights
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(other),
        "models": [{"model": str(taus[0]), "parameters": {"weight": 0.5}}],
    }
    want = content_fingerprint(open_checkpoint(llama.base))
    have = content_fingerprint(open_checkpoint(other))
    assert want != have and want.startswith("c1:")
    for extra in ([], ["--dry-run"]):
        res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", *extra)
        one_error_line(res, str(taus[0]), str(llama.base), want, str(other), have)
        no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# 2. Content fingerprints
# --------------------------------------------------------------------------------------------


def test_save_records_the_content_fingerprint(llama: Family, taus: list[Path]) -> None:
    want = content_fingerprint(open_checkpoint(llama.base))
    stored = tv.load(taus[0])
    assert isinstance(stored, StoredVector)
    assert stored.base_fingerprint == want == tv.load(llama.base).fingerprint()
    assert stored.ckpt.metadata["taskvec.base_path"] == str(llama.base)
    info = json.loads((taus[0] / "taskvec.json").read_text())
    assert info["base_fingerprint"] == want and info["base_path"] == str(llama.base)
    # the fingerprint is of the content: another fine-tune of one architecture differs
    assert tv.load(llama.fts[0]).fingerprint() != want


def test_resaving_a_stored_vector_keeps_its_base(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    half = (0.5 * tv.load(taus[0]) + 0.5 * tv.load(taus[1])).save(tmp_path / "h", progress=False)
    again = tv.load(half)
    assert isinstance(again, StoredVector)
    assert again.base_fingerprint == tv.load(taus[0]).base_fingerprint


def test_the_same_weights_in_another_layout_are_the_same_base(bert: Family, tmp_path: Path) -> None:
    tau = (tv.load(bert.fts[0]) - tv.load(bert.base)).save(tmp_path / "tau", progress=False)
    stored = tv.load(tau)
    for layout in ("st-base", "pt-base", "bin-base"):
        other = tv.load(bert.extra[layout])
        assert other.fingerprint() == stored.base_fingerprint, layout
        out = load_folder((other + stored).save(tmp_path / layout, progress=False))
        for k, b in bert.base_sd.items():
            if b.is_floating_point():
                torch.testing.assert_close(out[k], bert.ft_sds[0][k], rtol=0, atol=1e-6)


def test_applying_to_another_base_is_refused(
    llama: Family, taus: list[Path], tmp_path: Path, no_leftovers: Check
) -> None:
    other = tv.load(llama.fts[1])
    stored = tv.load(taus[0])
    want, have = stored.base_fingerprint, other.fingerprint()
    needles = (str(taus[0]), str(llama.base), want, str(llama.fts[1]), have, "allow_other_base")
    for attempt in (
        lambda: tv.apply(other, [stored]),
        lambda: other + stored,
        lambda: other + 0.5 * stored.select("model.layers.*"),
        lambda: other - stored,
    ):
        with pytest.raises(IncompatibleError) as err:
            attempt()
        assert all(n in str(err.value) for n in needles), str(err.value)
    res = run_cli("apply", llama.fts[1], taus[0], tmp_path / "out", "--no-progress")
    one_error_line(res, *needles[:-1], "--any-base")
    no_leftovers(tmp_path / "out")


def test_applying_to_another_base_when_asked(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    api = tv.apply(tv.load(llama.fts[1]), [tv.load(taus[0])], 0.5, allow_other_base=True)
    api_out = load_folder(api.save(tmp_path / "api", progress=False))
    res = run_cli("apply", llama.fts[1], taus[0], tmp_path / "cli", "--scale", "0.5", "--any-base")
    assert res.exit_code == 0, res.stderr
    cli_out = load_folder(tmp_path / "cli")
    stored = load_folder(taus[0])
    for k, b in llama.ft_sds[1].items():
        assert torch.equal(cli_out[k], api_out[k]), k
        assert_within(
            cli_out[k], b.double() + 0.5 * stored[k].double(), formula_bound(b, stored[k])
        )


def test_stored_vectors_add_to_their_base_plus_other_vectors(
    llama: Family, taus: list[Path]
) -> None:
    """``base + τ₁ + τ₂`` is built on base: τ₂ of that base is accepted; so is a soup of
    base + τᵢ; a soup of fine-tunes is no saved checkpoint plus task vectors: refused."""
    base = tv.load(llama.base)
    s0, s1 = tv.load(taus[0]), tv.load(taus[1])
    chained = base + s0 + s1
    assert chained.fingerprint() is None  # an expression has no file content
    soup = ((base + s0) + (tv.load(llama.base) + s1)) / 2
    assert (soup + s0).names == base.names
    fine_tunes = (tv.load(llama.fts[0]) + tv.load(llama.fts[1])) / 2
    with pytest.raises(IncompatibleError, match="cannot check that task vector"):
        fine_tunes + s0
    assert tv.apply(fine_tunes, [s0], allow_other_base=True).names == base.names


def test_a_vector_of_an_expression_records_no_fingerprint(
    llama: Family, taus: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base_plus = tv.load(llama.base) + tv.load(taus[0])
    with caplog.at_level(logging.WARNING, logger="taskvec"):
        path = (tv.load(llama.fts[2]) - base_plus).save(tmp_path / "tau", progress=False)
    assert any("no base fingerprint recorded" in r.getMessage() for r in caplog.records)
    stored = tv.load(path)
    assert isinstance(stored, StoredVector) and stored.base_fingerprint is None
    assert "base_fingerprint" not in json.loads((path / "taskvec.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="taskvec"):
        tv.load(llama.base) + stored  # nothing to check against: said, not silent
    assert any("records no base fingerprint" in r.getMessage() for r in caplog.records)


def _with_structural_fingerprint(tau: Path, out: Path, fingerprint: str) -> Path:
    """A copy of ``tau`` as older taskvec saved it: a structural base fingerprint, no path."""
    shutil.copytree(tau, out)
    weights = out / "model.safetensors"
    meta = {"taskvec.kind": "task_vector", "taskvec.base_fingerprint": fingerprint}
    save_file(load_file(str(weights)), str(weights), metadata=meta)
    return out


def test_an_old_structural_fingerprint_is_compared_structurally(
    llama: Family, bert: Family, taus: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    structural = _fingerprint(tv.load(llama.base).specs)
    old = tv.load(_with_structural_fingerprint(taus[0], tmp_path / "old", structural))
    with caplog.at_level(logging.INFO, logger="taskvec"):
        applied = tv.load(llama.fts[1]) + old  # same names and shapes: accepted
    assert applied.names == tv.load(llama.base).names
    logged = [r.getMessage() for r in caplog.records if "structural" in r.getMessage()]
    assert logged and "only tensor names and shapes are compared" in logged[0]
    res = run_cli("info", tmp_path / "old")
    assert res.exit_code == 0 and f"base fingerprint: {structural} (structural" in res.stdout
    # a structural fingerprint of another shape of model does not match
    other = _with_structural_fingerprint(taus[0], tmp_path / "other", "0123456789abcdef")
    with pytest.raises(IncompatibleError, match="tensor names or shapes differ"):
        tv.load(llama.base) + tv.load(other)


def test_info_prints_the_content_fingerprint(llama: Family, taus: list[Path]) -> None:
    res = run_cli("info", llama.base)
    assert res.exit_code == 0, res.stderr
    want = content_fingerprint(open_checkpoint(llama.base))
    assert f"fingerprint: {want}" in res.stdout
    res = run_cli("info", taus[0])
    assert res.exit_code == 0, res.stderr
    assert f"base fingerprint: {want}\n" in res.stdout
    assert f"base path:  {llama.base}" in res.stdout


# --------------------------------------------------------------------------------------------
# 3. Tensors that would be dropped
# --------------------------------------------------------------------------------------------


def _with_extra(fam: Family, folder: Path, name: str, value: torch.Tensor) -> Path:
    """The first fine-tune plus one tensor, as a single safetensors file."""
    folder.mkdir()
    sd = {**fam.ft_sds[0], name: value}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def test_a_float_tensor_missing_from_the_base_is_refused(
    llama: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    extra = _with_extra(llama, tmp_path / "ft", "score.weight", torch.ones(3, 32))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (extra, llama.fts[1])],
    }
    path = write_config(tmp_path / "c.yml", cfg)
    needles = ("'score.weight'", str(extra / "model.safetensors"), f"base {llama.base}")
    res = run_cli("merge", path, tmp_path / "out", "--no-progress")
    one_error_line(res, *needles, "dropped")
    no_leftovers(tmp_path / "out")
    res = run_cli("merge", path, tmp_path / "out", "--dry-run")
    assert res.exit_code == 1 and all(n in res.stderr for n in needles), res.stderr
    no_leftovers(tmp_path / "out")
    # without a base, the output follows the first model: a tensor only a later one has
    linear = {
        "merge_method": "linear",
        "models": [{"model": str(llama.fts[1])}, {"model": str(extra)}],
        "parameters": {"weight": 1.0},
    }
    problems = plan_merge(linear).problems
    assert len(problems) == 1 and "'score.weight'" in problems[0]
    assert f"missing from the model {llama.fts[1]}" in problems[0]


def test_a_layer_tensor_missing_from_a_slice_reference_is_refused(
    llama: Family, tmp_path: Path
) -> None:
    extra = _with_extra(llama, tmp_path / "ft", "model.layers.1.adapter.weight", torch.ones(2))
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llama.base), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(extra), "layer_range": [1, 2]}]},
        ],
    }
    problems = plan_merge(cfg).problems
    assert len(problems) == 1 and "'model.layers.1.adapter.weight'" in problems[0], problems
    # the layers a source does not contribute do not count
    cfg["slices"][1]["sources"][0]["layer_range"] = [0, 1]
    assert plan_merge(cfg).problems == []


def test_a_buffer_missing_from_the_base_is_left_out_with_a_warning(
    llama: Family, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = _with_extra(llama, tmp_path / "ft", "model.position_ids", torch.arange(8)[None])
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(extra), "parameters": {"weight": 1.0}}],
    }
    with caplog.at_level(logging.WARNING, logger="taskvec"):
        merge(cfg, tmp_path / "out", progress=False)
    logged = [r.getMessage() for r in caplog.records if "model.position_ids" in r.getMessage()]
    assert len(logged) == 1 and "non-float" in logged[0] and str(llama.base) in logged[0]
    assert load_folder(tmp_path / "out").keys() == llama.base_sd.keys()


def _index_copy(fam: Family, out: Path) -> tuple[Path, dict[str, Any]]:
    shutil.copytree(fam.base, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out, index


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_an_index_entry_whose_shard_lacks_the_tensor_is_refused(
    llama: Family, tmp_path: Path
) -> None:
    folder, index = _index_copy(llama, tmp_path / "listed")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]  # the tensor is in shards[0]
    _write_index(folder, index)
    with pytest.raises(CheckpointError, match="does not hold it") as err:
        open_checkpoint(folder)
    assert repr(name) in str(err.value) and shards[1] in str(err.value)
    one_error_line(run_cli("info", folder), repr(name), shards[1])

    folder, index = _index_copy(llama, tmp_path / "ghost")
    index["weight_map"]["model.ghost.weight"] = shards[0]  # in no shard at all
    _write_index(folder, index)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(folder),
        "models": [{"model": str(llama.fts[0]), "parameters": {"weight": 1.0}}],
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--dry-run")
    one_error_line(res, "'model.ghost.weight'", shards[0], "does not hold it")
