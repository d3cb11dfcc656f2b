"""RegMean++ on tiny BERT fine-tunes: each merged block is RegMean's closed form for the inputs
that block receives in the merged model itself (re-derived here from the merged model's own
hidden states, with numpy), outside tensors are the mean, and one model merges to itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Family, load_folder, run_cli
from test_forward_stats import TEXTS, WORDS, add_tokenizer, padded
from test_foundation_errors import one_error_line
from test_methods_statistics import np_regmean

from taskvec.forward import load_model
from taskvec.regmean_plusplus import PlusPlusSettings, regmean_plusplus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experts(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rmpp")
    folders = {"base": bert.base, **{f"t{i}": f for i, f in enumerate(bert.fts[:2])}}
    return {k: add_tokenizer(Path(shutil.copytree(v, root / k))) for k, v in folders.items()}


def _texts(task: int) -> list[str]:
    """Enough tokens (~400) that every Gram matrix is well conditioned."""
    rng = np.random.default_rng(task)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(50)]


def test_each_block_is_regmean_on_the_merged_models_inputs(experts: dict[str, Path]) -> None:
    settings = PlusPlusSettings(alpha=0.9, batch_size=3)
    tasks = {"t0": experts["t0"], "t1": experts["t1"]}
    merged = regmean_plusplus(experts["base"], tasks, {"t0": _texts(0), "t1": _texts(1)}, settings)
    model = load_model(experts["base"], "base")
    missing, _ = model.load_state_dict(merged, strict=False)
    assert not [n for n in missing if "position_ids" not in n]
    own = {t: load_model(p, "base") for t, p in tasks.items()}
    # outside the blocks: the mean of the models
    for name in ("embeddings.word_embeddings.weight", "pooler.dense.weight"):
        want = np.mean([dict(m.named_parameters())[name].detach().numpy() for m in own.values()], 0)
        np.testing.assert_allclose(merged[name].numpy(), want, rtol=1e-6, atol=1e-7)
    for layer in range(2):
        grams: dict[str, list[np.ndarray]] = {"query": [], "dense": []}
        for task, m in enumerate(own.values()):
            ids, mask = padded(_texts(task))
            passed: list = []  # what block `layer` receives in the merged model (mask...)
            grab = model.encoder.layer[layer].register_forward_pre_hook(
                lambda _m, a, kw, into=passed: into.append((a[1:], kw)), with_kwargs=True
            )
            with torch.no_grad():
                x = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            grab.remove()
            rows = x.hidden_states[layer][mask.bool()].double()
            grams["query"].append((rows.T @ rows / rows.shape[0]).numpy())
            seen: list[torch.Tensor] = []  # the FFN output's input, in the expert's own block
            block = m.encoder.layer[layer]
            hook = block.output.dense.register_forward_hook(
                lambda _m, a, _o, into=seen: into.append(a[0])
            )
            with torch.no_grad():
                block(x.hidden_states[layer], *passed[0][0], **passed[0][1])
            hook.remove()
            inner = seen[0][mask.bool()].double()
            grams["dense"].append((inner.T @ inner / inner.shape[0]).numpy())
        for part, module in (("query", "attention.self.query"), ("dense", "output.dense")):
            name = f"encoder.layer.{layer}.{module}.weight"
            ws = np.stack(
                [dict(m.named_parameters())[name].detach().double().numpy() for m in own.values()]
            )
            want = np_regmean(ws, np.stack(grams[part]), 0.9)
            np.testing.assert_allclose(merged[name].double().numpy(), want, rtol=1e-4, atol=1e-6)


def test_one_model_merges_to_itself(experts: dict[str, Path]) -> None:
    merged = regmean_plusplus(
        experts["base"], {"t0": experts["t0"]}, {"t0": TEXTS}, PlusPlusSettings(batch_size=4)
    )
    own = dict(load_model(experts["t0"], "base").named_parameters())
    for name, value in merged.items():
        np.testing.assert_allclose(value.numpy(), own[name].detach().numpy(), rtol=1e-4, atol=1e-5)


def _config(experts: dict[str, Path], root: Path, **extra: object) -> Path:
    data = {}
    for task in (0, 1):
        path = root / f"t{task}.jsonl"
        path.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in _texts(task)))
        data[f"t{task}"] = f"{path.name}:sentence"  # relative to the config's folder
    cfg = {
        "merge_method": "regmean_plusplus",
        "base_model": str(experts["base"]),
        "models": [{"model": str(experts[t]), "data": data[t]} for t in ("t0", "t1")],
        "parameters": {"alpha": 0.9, "batch_size": 8},
        **extra,
    }
    (root / "m.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "m.yml"


def test_from_a_merge_config(experts: dict[str, Path], tmp_path: Path) -> None:
    config = _config(experts, tmp_path)
    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "task t0:" in dry.stdout and "alpha=0.9" in dry.stdout
    res = run_cli("merge", config, tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    want = regmean_plusplus(
        experts["base"],
        {"t0": experts["t0"], "t1": experts["t1"]},
        {"t0": _texts(0), "t1": _texts(1)},
        PlusPlusSettings(alpha=0.9, batch_size=8),
    )
    got = load_folder(tmp_path / "out")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert run_cli("verify", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"models": "drop data"}, "needs `data:`"),
        ({"parameters": {"alpha": 1.5}}, "alpha"),
        ({"models": "missing column"}, "column"),
        ({"merge_method": "ties"}, "runs no data"),
    ],
)
def test_bad_configs_are_one_line(
    experts: dict[str, Path], tmp_path: Path, change: dict, needle: str
) -> None:
    config = _config(experts, tmp_path)
    cfg = yaml.safe_load(config.read_text())
    if change.get("models") == "drop data":
        del cfg["models"][1]["data"]
    elif change.get("models") == "missing column":
        cfg["models"][0]["data"] = "t0.jsonl:nope"
    else:
        cfg.update(change)
    config.write_text(yaml.safe_dump(cfg))
    res = run_cli("merge", config, tmp_path / "out", "--no-progress")
    one_error_line(res, needle)
    assert not (tmp_path / "out").exists()
