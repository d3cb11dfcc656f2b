"""FDA on tiny models: the block interface, the anchor objective and its sign, both inits, both
adaptation modes (and that they change only what they should), the files, the config and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import Family, load_folder, run_cli

from taskvec.algebra import load_model
from taskvec.errors import IncompatibleError
from taskvec.fda.adapt import AdaptSettings, adapt_coefficients, adapt_parameters, targets
from taskvec.fda.anchors import (
    AnchorObjective,
    AnchorSet,
    AnchorSettings,
    construct_block,
    weight_init,
    weight_rows,
)
from taskvec.fda.blocks import BlockModel
from taskvec.fda.pipeline import FDA, Start, anchor_file

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = AnchorSettings(anchors=8, tokens=4, steps=3)


def _block_params(fam: Family, index: int) -> tuple:
    bm = BlockModel.open(fam.base)
    block = bm.block(index)
    theta0 = block.read(fam.base_sd)
    experts = [block.read(sd) for sd in fam.ft_sds]
    return block, theta0, experts


# --- the block interface ------------------------------------------------------------------


def test_bert_blocks_run_like_the_model(bert: Family) -> None:
    from transformers import AutoModel

    bm = BlockModel.open(bert.base)
    assert bm.num_blocks == 2 and bm.prefix == ""
    hf = AutoModel.from_pretrained(bert.base, attn_implementation="eager").eval()
    x = torch.randn(3, 5, 32)
    for i in range(2):
        block = bm.block(i)
        params = block.read(load_model(bert.base))
        assert set(block.checkpoint_names().values()) <= set(bert.base_sd)
        with torch.no_grad():
            want = hf.encoder.layer[i](x)
            want = want[0] if isinstance(want, tuple) else want
            got = block.forward(params, x)
        torch.testing.assert_close(got, want)


def test_llama_blocks_are_the_mlps_under_the_checkpoint_prefix(llama: Family) -> None:
    from transformers import AutoModelForCausalLM

    bm = BlockModel.open(llama.base)
    assert bm.prefix == "model." and bm.family.name == "decoder-mlp"
    block = bm.block(1)
    names = block.checkpoint_names()
    assert names["gate_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    hf = AutoModelForCausalLM.from_pretrained(llama.base).eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            block.forward(block.read(llama.base_sd), x), hf.model.layers[1].mlp(x)
        )
    assert block.input_shape(4) == (4, 32)


def test_unsupported_family_and_foreign_names_are_refused(bert: Family) -> None:
    with pytest.raises(IncompatibleError, match="no block interface"):
        BlockModel({"model_type": "gpt_neox"}, [])
    config = load_model(bert.base).primary.config
    assert config is not None
    with pytest.raises(IncompatibleError, match="does not match its config"):
        BlockModel(config, ["something.else.weight"])


# --- construction ---------------------------------------------------------------------------


def test_anchor_alignment_rises_and_its_sign_moves_theta0_towards_the_expert(
    bert: Family,
) -> None:
    block, theta0, experts = _block_params(bert, 1)
    settings = AnchorSettings(anchors=16, tokens=4, steps=40, seed=3)
    made = construct_block(block, theta0, experts[:1], ["a"], settings)
    assert made.alignment[0] > made.start_alignment[0] + 0.2
    assert made.alignment[0] > 0.3
    assert len(made.history) == settings.steps + 1

    # independent of AnchorObjective: plain autograd on the distance 1 − S from θ0. Its
    # descent direction equals the objective's induced gradient tensor by tensor (key.bias has
    # none: softmax ignores it), and a small step along it moves θ0 towards θ1
    x = made.anchors[0]
    with torch.no_grad():
        y = block.forward(experts[0], x)
    theta = {n: v.clone().requires_grad_(True) for n, v in theta0.items()}
    out = block.forward(theta, x)
    dist = 1 - torch.nn.functional.cosine_similarity(out.flatten(1), y.flatten(1)).mean()
    grads = torch.autograd.grad(dist, list(theta.values()))
    descent = {n: -g.flatten() for n, g in zip(theta, grads, strict=True)}
    induced = AnchorObjective(block, theta0, experts[:1]).induced_gradients(
        made.anchors[:1], create_graph=False
    )
    for n in descent:
        torch.testing.assert_close(descent[n], induced[n][0], rtol=1e-4, atol=1e-9)
    tau = {n: (experts[0][n] - theta0[n]).flatten() for n in theta0}
    overall = torch.nn.functional.cosine_similarity(
        torch.cat(list(descent.values())), torch.cat(list(tau.values())), dim=0
    )
    assert overall > 0


def test_objective_leaves_out_tensors_no_expert_changed(bert: Family) -> None:
    block, theta0, experts = _block_params(bert, 0)
    frozen = dict(experts[0])
    untouched = "output.LayerNorm.bias"
    frozen[untouched] = theta0[untouched].clone()
    objective = AnchorObjective(block, theta0, [frozen])
    assert untouched not in objective.names
    x = torch.randn(1, 4, 3, 32) * 0.01
    loss = objective.loss(x, create_graph=False)
    assert loss.shape == (1,) and 0 <= float(loss) <= 2 * len(objective.names)


def test_gauss_init_is_one_shared_scaled_draw(bert: Family) -> None:
    block, theta0, experts = _block_params(bert, 0)
    s = AnchorSettings(anchors=64, tokens=5, steps=0, sigma=0.01)
    made = construct_block(block, theta0, experts, ["a", "b"], s)
    x = made.anchors
    assert x.shape == (2, 64, 5, 32)
    torch.testing.assert_close(x[0], x[1])
    assert 0.008 < float(x.std()) < 0.012


def test_weight_init_samples_rows_and_pads_with_midpoints(bert: Family) -> None:
    block, _, experts = _block_params(bert, 0)
    rows = weight_rows(block, experts[0])
    # q, k, v, attention output (32 rows each) and the MLP's input layer (64): 192 rows of 32
    assert rows.shape == (192, 32)
    few = weight_init(block, experts[:1], AnchorSettings(anchors=6, tokens=4, init="weight"))
    flat = few[0].reshape(-1, 32)
    assert len({tuple(r.tolist()) for r in flat}) == 24  # without replacement
    assert all(bool((rows == r).all(1).any()) for r in flat)

    many = weight_init(block, experts[:1], AnchorSettings(anchors=50, tokens=5, init="weight"))
    flat = many[0].reshape(-1, 32)
    assert all(bool((rows == r).all(1).any()) for r in flat[:192])
    midpoints = (rows[:, None, :] + rows[None, :, :]) / 2
    for r in flat[192:200]:
        assert bool(torch.isclose(midpoints, r, atol=1e-7).all(-1).any())


def test_anchor_files_round_trip_and_are_reused(bert: Family, tmp_path: Path) -> None:
    fda = FDA(bert.base, {"a": bert.fts[0], "b": bert.fts[1]})
    first = fda.construct(tmp_path, FAST, progress=False)
    assert sorted(first.seconds) == ["block 0", "block 1"] and not first.reused
    loaded = AnchorSet.load(anchor_file(tmp_path, 1))
    assert loaded.tasks == ["a", "b"] and loaded.settings == FAST
    assert loaded.alignment == list(first.alignment[1].values())
    again = fda.construct(tmp_path, FAST, progress=False)
    assert again.reused == [0, 1] and not again.seconds
    other = fda.construct(tmp_path, AnchorSettings(anchors=8, tokens=4, steps=4), progress=False)
    assert not other.reused


# --- adaptation -----------------------------------------------------------------------------


def test_parameter_mode_fits_the_targets_and_changes_only_the_block(bert: Family) -> None:
    block, theta0, experts = _block_params(bert, 1)
    made = construct_block(block, theta0, experts, ["a", "b"], FAST)
    target = targets(block, experts, made)
    x = made.anchors.flatten(0, 1)

    def loss(params: dict) -> float:
        out = block.forward(params, x)
        return float((out - target.flatten(0, 1)).pow(2).sum())

    new = adapt_parameters(block, theta0, made, target, AdaptSettings(lr=1e-3, epochs=30))
    assert set(new) == set(theta0)
    assert loss(new) < 0.5 * loss(theta0)


def test_coefficient_mode_moves_only_along_the_frozen_vectors(bert: Family) -> None:
    block, theta0, experts = _block_params(bert, 0)
    made = construct_block(block, theta0, experts, ["a", "b"], FAST)
    target = targets(block, experts, made)
    tau = [{n: p[n] - theta0[n] for n in theta0} for p in experts]
    tau[0]["output.dense.bias"] = torch.zeros_like(tau[0]["output.dense.bias"])
    tau[1]["output.dense.bias"] = torch.zeros_like(tau[1]["output.dense.bias"])
    start = adapt_coefficients(block, theta0, tau, 0.3, made, target, AdaptSettings(epochs=0))
    for n in theta0:
        torch.testing.assert_close(start[n], theta0[n] + 0.3 * (tau[0][n] + tau[1][n]))
    new = adapt_coefficients(block, theta0, tau, 0.3, made, target, AdaptSettings(epochs=5))
    assert torch.equal(new["output.dense.bias"], theta0["output.dense.bias"])
    assert any(not torch.allclose(new[n], start[n]) for n in theta0)


def test_whole_model_modes_keep_everything_outside_the_blocks(bert: Family, tmp_path: Path) -> None:
    fda = FDA(bert.base, {"a": bert.fts[0], "b": bert.fts[1]})
    fda.construct(tmp_path / "anchors", FAST, progress=False)
    quick = AdaptSettings(epochs=2)
    fda.adapt(tmp_path / "anchors", tmp_path / "from-base", Start(), quick, progress=False)
    fda.adapt(
        tmp_path / "anchors",
        tmp_path / "from-ta",
        Start.parse("task_arithmetic", 0.5),
        quick,
        progress=False,
    )
    inside = BlockModel.open(bert.base).block_tensor_names()
    from_base, from_ta = load_folder(tmp_path / "from-base"), load_folder(tmp_path / "from-ta")
    for name, value in bert.base_sd.items():
        ta = value + 0.5 * sum(sd[name] - value for sd in bert.ft_sds)
        if name in inside:
            assert not torch.equal(from_base[name], value)
        else:
            assert torch.equal(from_base[name], value), name
            torch.testing.assert_close(from_ta[name], ta, rtol=0, atol=1e-6)


# --- config, CLI, errors --------------------------------------------------------------------


def _fda_config(bert: Family, tmp_path: Path, **parameters: object) -> Path:
    cfg = {
        "merge_method": "fda",
        "base_model": str(bert.base),
        "models": [{"model": str(p)} for p in bert.fts],
        "parameters": {"anchors": 4, "tokens": 3, "steps": 2, "epochs": 1, **parameters},
    }
    path = tmp_path / "fda.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_config_runs_fda_and_dry_run_writes_nothing(bert: Family, tmp_path: Path) -> None:
    config = _fda_config(bert, tmp_path, start="ties", anchor_dir=str(tmp_path / "a"))
    dry = run_cli("merge", config, tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "plan: fda" in dry.output and not (tmp_path / "dry").exists()
    done = run_cli("merge", config, tmp_path / "out", "--no-progress")
    assert done.exit_code == 0, done.output
    assert len(load_folder(tmp_path / "out")) == len(bert.base_sd)
    assert (tmp_path / "a" / "block-001.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taskvec-fda")]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"inits": "gauss"}, "unknown fda parameter 'inits'"),
        ({"init": "uniform"}, "unknown anchor init"),
        ({"steps": [1, 2]}, "takes one value"),
        ({"start": "/no/such/model"}, "neither 'base'"),
    ],
)
def test_bad_fda_configs_fail_in_one_line_before_work(
    bert: Family, tmp_path: Path, parameters: dict, message: str
) -> None:
    result = run_cli("merge", _fda_config(bert, tmp_path, **parameters), tmp_path / "out")
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_construct_then_adapt(bert: Family, tmp_path: Path) -> None:
    models = [bert.base, *bert.fts]
    made = run_cli(
        "fda",
        "construct",
        *models,
        "-o",
        tmp_path / "anchors",
        "--anchors",
        "4",
        "--tokens",
        "3",
        "--steps",
        "2",
        "--init",
        "weight",
        "--no-progress",
    )
    assert made.exit_code == 0, made.output
    assert "alignment" in made.output
    out = tmp_path / "adapted"
    done = run_cli(
        "fda",
        "adapt",
        *models,
        "--anchors",
        tmp_path / "anchors",
        "-o",
        out,
        "--epochs",
        "1",
        "--report",
        tmp_path / "r.json",
        "--no-progress",
    )
    assert done.exit_code == 0, done.output
    assert (out / "config.json").exists() and (tmp_path / "r.json").exists()


def test_shape_mismatch_and_wrong_anchors_are_refused(
    bert: Family, llama: Family, tmp_path: Path
) -> None:
    result = run_cli("fda", "construct", bert.base, llama.fts[0], "-o", tmp_path / "x")
    assert result.exit_code == 1 and "Traceback" not in result.output
    fda = FDA(bert.base, {"a": bert.fts[0], "b": bert.fts[1]})
    fda.construct(tmp_path / "anchors", FAST, progress=False)
    swapped = FDA(bert.base, {"b": bert.fts[1], "c": bert.fts[0]})
    with pytest.raises(IncompatibleError, match="are for tasks"):
        swapped.adapt(tmp_path / "anchors", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused_before_optimising(bert: Family) -> None:
    from taskvec.errors import NumericError

    block = BlockModel.open(bert.base).block(0)
    broken = dict(bert.ft_sds[0])
    name = block.checkpoint_names()["intermediate.dense.weight"]
    broken[name] = broken[name].clone()
    broken[name][0, 0] = float("nan")
    with pytest.raises(NumericError, match="intermediate.dense.weight"):
        block.read(broken)


def test_vit_blocks_run_like_the_model() -> None:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=8,
        patch_size=4,
    )
    torch.manual_seed(0)
    hf = ViTModel(cfg).eval()
    sd = {f"vit.{k}": v for k, v in hf.state_dict().items()}  # a classifier's prefix
    bm = BlockModel(cfg.to_dict(), list(sd))
    assert bm.num_blocks == 2 and bm.prefix == "vit."
    block = bm.block(1)
    fc1 = f"vit.{block.path}.mlp.fc1.weight"  # transformers 5 names; 4 has encoder.layer
    assert block.checkpoint_names()["mlp.fc1.weight"] == fc1
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        want = hf.get_submodule(block.path)(x)
        want = want[0] if isinstance(want, tuple) else want
        torch.testing.assert_close(block.forward(block.read(sd), x), want)


def test_bad_block_lists_fail_before_any_construction(bert: Family, tmp_path: Path) -> None:
    models = [bert.base, *bert.fts]
    typo = run_cli("fda", "construct", *models, "-o", tmp_path / "a", "--blocks", "0,x")
    assert typo.exit_code == 2 and "comma-separated list of integers" in typo.output
    far = run_cli("fda", "construct", *models, "-o", tmp_path / "b", "--blocks", "0,7")
    assert far.exit_code == 1 and "block 7 out of range" in far.output
    assert not (tmp_path / "b").exists()  # checked before block 0 was built
