"""AdaMerging's core (taskvec.adamerging) against autograd through θ(λ) and a hand Adam step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Family, load_folder, run_cli
from safetensors.torch import load_file
from test_forward_stats import TEXTS, add_tokenizer
from test_foundation_errors import one_error_line

from taskvec.adamerging import AdaSettings, adamerging, coefficient_grad, entropy, groups_of

transformers = pytest.importorskip("transformers")
T = 3


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("bert.")}
    taus = [{n: 0.3 * torch.randn_like(w) for n, w in base.items()} for _ in range(T)]
    heads = [
        {n: torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("classifier")}
        for _ in range(T)
    ]
    inputs = [torch.randint(0, 30, (4, 6)) for _ in range(T)]
    return model, base, taus, heads, inputs


def _loss(model, heads, inputs):
    def loss(_step: int) -> torch.Tensor:
        total = torch.zeros(())
        for head, ids in zip(heads, inputs, strict=True):  # task t's head on the merged body
            pooled = model.bert(input_ids=ids).pooler_output
            logits = torch.nn.functional.linear(
                pooled, head["classifier.weight"], head["classifier.bias"]
            )
            total = total + entropy(logits)
        return total

    return loss


def _autograd(model, base, taus, heads, inputs, lam, groups):
    """∂L/∂λ by autograd through θ(λ) = θ₀ + Σ λ τ, written out directly."""
    lam = lam.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for head, ids in zip(heads, inputs, strict=True):
        theta = {
            n: w + sum(lam[i, groups[n]] * taus[i][n] for i in range(T)).float()
            for n, w in base.items()
        }
        theta |= head
        logits = torch.func.functional_call(model, theta, (), {"input_ids": ids}).logits
        total = total + entropy(logits)
    total.backward()
    return lam.grad


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_streamed_gradient_is_autograd_through_lambda(granularity):
    model, base, taus, heads, inputs = _setup()
    groups = groups_of(base, granularity)
    assert len(set(groups.values())) == (3 if granularity == "layer" else 1)
    n_groups = max(groups.values()) + 1
    lam = 0.1 + torch.rand(T, n_groups, dtype=torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in base.items():
            params[n].copy_(w + sum(lam[i, groups[n]] * taus[i][n] for i in range(T)).float())
    model.zero_grad()
    _loss(model, heads, inputs)(0).backward()
    streamed = coefficient_grad({n: params[n] for n in base}, [t.__getitem__ for t in taus], groups)
    want = _autograd(model, base, taus, heads, inputs, lam, groups)
    torch.testing.assert_close(streamed, want, rtol=1e-4, atol=1e-6)


def test_one_adam_step_and_task_arithmetic_at_zero_steps():
    model, base, taus, heads, inputs = _setup()
    vectors = [t.__getitem__ for t in taus]
    zero = adamerging(model, base, vectors, _loss(model, heads, inputs), AdaSettings(steps=0))
    for n, w in base.items():
        torch.testing.assert_close(zero.merged[n], w + 0.3 * sum(t[n] for t in taus))

    settings = AdaSettings(steps=1, lr=1e-2, clamp=False)
    groups = groups_of(base, "layer")
    g = _autograd(
        model, base, taus, heads, inputs, torch.full((T, 3), 0.3, dtype=torch.float64), groups
    )
    # Adam's first step: m̂ = g, v̂ = g², so λ₁ = λ₀ − lr · g / (|g| + ε)
    want = 0.3 - 1e-2 * g / (g.abs() + 1e-8)
    one = adamerging(model, base, vectors, _loss(model, heads, inputs), settings)
    torch.testing.assert_close(one.coefficients, want, rtol=1e-6, atol=1e-6)
    n = "bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(
        one.merged[n], base[n] + sum(want[i, 1] * taus[i][n] for i in range(T)).float()
    )


def test_entropy_decreases():
    model, base, taus, heads, inputs = _setup(1)
    result = adamerging(
        model,
        base,
        [t.__getitem__ for t in taus],
        _loss(model, heads, inputs),
        AdaSettings(steps=15, lr=5e-2),
    )
    assert result.losses[-1] < result.losses[0] - 1e-3
    assert result.coefficients.min() >= 0 and result.coefficients.max() <= 1


@pytest.fixture(scope="module")
def experts(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny BERT encoder as base, and two classifiers (3 labels) whose bodies are its
    fine-tunes and whose heads differ."""
    root = tmp_path_factory.mktemp("ada")
    folders = {"base": add_tokenizer(Path(shutil.copytree(bert.base, root / "base")))}
    config = transformers.BertConfig.from_pretrained(bert.base, num_labels=3)
    for i, ft in enumerate(bert.fts[:2]):
        torch.manual_seed(i)
        clf = transformers.BertForSequenceClassification(config).eval()
        clf.bert.load_state_dict(load_folder(ft), strict=False)
        clf.save_pretrained(root / f"t{i}")
        folders[f"t{i}"] = add_tokenizer(root / f"t{i}")
    return folders


def _config(experts: dict[str, Path], root: Path, **parameters: object) -> Path:
    models = []
    for task in ("t0", "t1"):
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
        models.append({"model": str(experts[task]), "data": f"{path.name}:sentence"})
    cfg = {
        "merge_method": "adamerging",
        "base_model": str(experts["base"]),
        "models": models,
        "parameters": {"batch_size": 4, **parameters},
    }
    (root / "m.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "m.yml"


def test_zero_steps_from_a_config_is_task_arithmetic(experts, tmp_path):
    config = _config(experts, tmp_path, steps=0, granularity="task")
    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "task t0:" in dry.stdout
    res = run_cli("merge", config, tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    got = load_folder(tmp_path / "out")
    base = load_folder(experts["base"])
    fts = [load_folder(experts[t]) for t in ("t0", "t1")]
    for name, w in base.items():
        want = w + 0.3 * sum(ft["bert." + name] - w for ft in fts)
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6)
    record = json.loads((tmp_path / "out" / "adamerging.json").read_text())
    assert record["tasks"] == ["t0", "t1"] and record["coefficients"] == [[0.3], [0.3]]
    for task, ft in zip(("t0", "t1"), fts, strict=True):  # each task's head, as its expert's
        head = load_file(tmp_path / "out" / "heads" / f"{task}.safetensors")
        assert set(head) == {"classifier.weight", "classifier.bias"}
        for name, t in head.items():
            torch.testing.assert_close(t, ft[name], rtol=0, atol=0)
    manifest = json.loads((tmp_path / "out" / "taskvec-manifest.json").read_text())
    assert manifest["producer"]["coefficients"] == {"t0": [0.3], "t1": [0.3]}
    assert run_cli("verify", tmp_path / "out").exit_code == 0


def test_some_steps_from_a_config(experts, tmp_path):
    res = run_cli("merge", _config(experts, tmp_path, steps=3), tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    record = json.loads((tmp_path / "out" / "adamerging.json").read_text())
    assert len(record["losses"]) == 3 and len(record["coefficients"][0]) == 3


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("missing column", "column"),
        ("missing file", "t0"),
        ("no head", "classification head"),
        ("granularity", "granularity"),
    ],
)
def test_bad_inputs_are_one_line(experts, tmp_path, change, needle):
    config = _config(
        experts, tmp_path, **({"granularity": "block"} if change == "granularity" else {})
    )
    cfg = yaml.safe_load(config.read_text())
    if change == "missing column":
        cfg["models"][0]["data"] = "t0.jsonl:text"
    elif change == "missing file":
        cfg["models"][0]["data"] = "nothing.jsonl:sentence"
    elif change == "no head":
        cfg["models"][0]["model"] = str(experts["base"])
    config.write_text(yaml.safe_dump(cfg))
    res = run_cli("merge", config, tmp_path / "out", "--no-progress")
    assert res.exit_code != 0
    assert needle in one_error_line(res)
    assert not (tmp_path / "out").exists()


def test_projection_replaces_the_clamp():
    from taskvec.search.gradient import project_simplex

    model, base, taus, heads, inputs = _setup()
    result = adamerging(
        model,
        base,
        [lambda n, t=t: t[n] for t in taus],
        _loss(model, heads, inputs),
        AdaSettings(granularity="layer", steps=5, lr=0.2, init=0.5, clamp=False),
        project=project_simplex,
    )
    lam = result.coefficients
    assert lam.min() >= 0
    torch.testing.assert_close(lam.sum(0), torch.ones(lam.shape[1], dtype=lam.dtype))


def test_learning_mode_is_undone_and_bfloat16_follows_float32():
    """Embeddings learn with sparse gradients and bfloat16 with eager attention; both are put
    back afterwards, and a bfloat16 step moves λ as the float32 one does (Adam's first step is
    ±lr per coefficient: the signs of the gradient agree)."""
    model, base, taus, heads, inputs = _setup()
    model.set_attn_implementation("sdpa")
    vectors = [t.__getitem__ for t in taus]
    settings = AdaSettings(steps=1, lr=1e-2, clamp=False)
    exact = adamerging(model, base, vectors, _loss(model, heads, inputs), settings)
    half = adamerging(
        model,
        base,
        vectors,
        _loss(model, heads, inputs),
        AdaSettings(steps=1, lr=1e-2, clamp=False, precision="bfloat16"),
    )
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert model.config._attn_implementation == "sdpa"
    agree = (exact.coefficients - 0.3).sign() == (half.coefficients - 0.3).sign()
    assert agree.float().mean() >= 0.8
    torch.testing.assert_close(half.losses[0], exact.losses[0], rtol=2e-2, atol=0)
