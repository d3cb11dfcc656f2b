"""Twin-Merging (taskvec.twin) on the tiny BERT family: the stored factors against a numpy SVD
of θₜ − θ* re-derived here, the hooked DynamicModel against an explicit per-input θ(x) run with
``functional_call``, full rank + one-hot routes against the expert itself, the router's weights,
and the command line's one-line refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Family, load_folder, run_cli
from safetensors.torch import load_file
from test_forward_stats import WORDS, add_tokenizer, padded
from test_foundation_errors import one_error_line
from torch.func import functional_call

from taskvec.twin.dynamic import DynamicModel
from taskvec.twin.router import Router, train_router

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 0.3


def task_texts(words: list[str], n: int) -> list[str]:
    return [
        " ".join(words[(5 * i + 3 * j) % len(words)] for j in range(2 + i % 5)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def setup(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Base and two experts with a tokenizer; router data: task a uses w0–w14, task b w15–w29."""
    root = tmp_path_factory.mktemp("twin")
    folders = {
        tag: add_tokenizer(Path(shutil.copytree(src, root / tag)))
        for tag, src in [("base", bert.base), ("a", bert.fts[0]), ("b", bert.fts[1])]
    }
    data = {}
    for task, words in [("a", WORDS[:15]), ("b", WORDS[15:])]:
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in task_texts(words, 24)))
        data[task] = path
    return {"root": root, **folders, "data": data}


def build(setup: dict, out: Path, *extra: str) -> Path:
    res = run_cli(
        "twin", "build", setup["base"], setup["a"], setup["b"], "-o", out,
        "--data", f"a={setup['data']['a']}", "--data", f"b={setup['data']['b']}",
        "--no-progress", *extra,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def twin(setup: dict) -> Path:
    return build(setup, setup["root"] / "twin")


@pytest.fixture(scope="module")
def full_rank(setup: dict) -> Path:
    return build(setup, setup["root"] / "twin-full", "--fraction", "1")


def theta_star(bert: Family) -> dict[str, torch.Tensor]:
    base = bert.base_sd
    return {n: base[n] + SCALE * sum(sd[n] - base[n] for sd in bert.ft_sds) for n in base}


def dense(factors: dict[str, torch.Tensor], task: str, name: str) -> torch.Tensor:
    if f"{task}/{name}" in factors:
        return factors[f"{task}/{name}"]
    return factors[f"{task}/{name}:B"] @ factors[f"{task}/{name}:A"]


def test_factors_are_the_truncated_svd_of_expert_minus_shared(bert: Family, twin: Path) -> None:
    star = theta_star(bert)
    saved = load_folder(twin)
    factors = load_file(str(twin / "twin" / "factors.safetensors"))
    info = json.loads((twin / "twin.json").read_text())
    assert info["tasks"] == ["a", "b"]
    dense_bytes = 0
    for task, sd in zip("ab", bert.ft_sds, strict=True):
        for name in bert.base_sd:
            delta = (sd[name].double() - star[name].double()).numpy()
            dense_bytes += delta.size * 4
            if delta.ndim == 2:
                u, s, vh = np.linalg.svd(delta, full_matrices=False)
                k = math.ceil(0.1 * min(delta.shape))
                assert factors[f"{task}/{name}:B"].shape == (delta.shape[0], k)
                expect = (u[:, :k] * s[:k]) @ vh[:k]
            else:
                expect = delta
            got = dense(factors, task, name).double().numpy()
            np.testing.assert_allclose(got, expect, atol=1e-6)
    assert info["extra_bytes"] == sum(t.numel() * 4 for t in factors.values())
    assert info["extra_bytes"] < 0.5 * dense_bytes
    assert set(saved) == set(star)
    for n, t in saved.items():
        torch.testing.assert_close(t, star[n], atol=1e-6, rtol=0)


def materialised(twin: Path, star: dict[str, torch.Tensor], w: torch.Tensor) -> dict:
    """θ(x) = θ* + Σₜ wₜ vₜ as dense tensors, for one routing row ``w``."""
    factors = load_file(str(twin / "twin" / "factors.safetensors"))
    return {
        n: t + sum(w[i] * dense(factors, task, n) for i, task in enumerate("ab"))
        for n, t in star.items()
    }


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded(["w1 w2 w3 w4 w5", "w20 w21", "w3 w29 w17 w8"])


def per_input(
    model: torch.nn.Module, params_of_row: list[dict], ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    rows = [
        functional_call(
            model, p, (), {"input_ids": ids[b : b + 1], "attention_mask": mask[b : b + 1]}
        ).last_hidden_state
        for b, p in enumerate(params_of_row)
    ]
    return torch.cat(rows)


def test_dynamic_model_equals_per_input_materialisation(bert: Family, twin: Path) -> None:
    dm = DynamicModel.load(twin)
    star = {n: t.float() for n, t in dm.model.state_dict().items()}
    ids, mask = batch()
    w = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(3)) * 2, -1)
    got = dm(ids, mask, weights=w).last_hidden_state
    expect = per_input(dm.model, [materialised(twin, star, w[b]) for b in range(3)], ids, mask)
    torch.testing.assert_close(got, expect, atol=2e-5, rtol=1e-4)
    static = dm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - static).abs().max() > 1e-3  # the routed knowledge does change the output
    routed = dm(ids, mask).last_hidden_state  # the router's own weights
    expect = per_input(
        dm.model, [materialised(twin, star, r) for r in dm.route(ids, mask)], ids, mask
    )
    torch.testing.assert_close(routed, expect, atol=2e-5, rtol=1e-4)


def test_full_rank_one_hot_route_is_the_expert(setup: dict, full_rank: Path) -> None:
    from transformers import BertModel

    dm = DynamicModel.load(full_rank)
    ids, mask = batch()
    for t, task in enumerate("ab"):
        w = torch.nn.functional.one_hot(torch.full((3,), t), 2).float()
        expert = BertModel.from_pretrained(setup[task]).eval()
        expect = expert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = dm(ids, mask, weights=w).last_hidden_state
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_router_weights_are_the_softmax_of_the_mlp(twin: Path) -> None:
    dm = DynamicModel.load(twin)
    ids, mask = batch()
    hidden = dm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    feats = (hidden * m).sum(1) / m.sum(1)
    p = load_file(str(twin / "twin" / "router.safetensors"))
    h = torch.relu(feats @ p["net.0.weight"].T + p["net.0.bias"])
    h = torch.relu(h @ p["net.2.weight"].T + p["net.2.bias"])
    logits = h @ p["net.4.weight"].T + p["net.4.bias"]
    w = dm.route(ids, mask)
    torch.testing.assert_close(w, torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert w[0].argmax() == 0 and w[1].argmax() == 1  # a-words → a, b-words → b
    assert torch.equal(Router(4, 1).weights(torch.randn(5, 4)), torch.ones(5, 1))


def test_router_training_is_seeded_and_separates_tasks() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 6, generator=g) + 3, torch.randn(20, 6, generator=g) - 3])
    y = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    r1, r2, r3 = (train_router(x, y, 2, seed=s, epochs=50) for s in (1, 1, 2))
    for k, v in r1.state_dict().items():
        assert torch.equal(v, r2.state_dict()[k])
    assert any(not torch.equal(v, r3.state_dict()[k]) for k, v in r1.state_dict().items())
    assert torch.equal(r1.weights(x).argmax(1), y)


def test_bad_inputs_are_one_line(setup: dict, llama: Family, tmp_path: Path, no_leftovers) -> None:
    out = tmp_path / "out"
    a, b = f"a={setup['data']['a']}", f"b={setup['data']['b']}"
    base, ea, eb = setup["base"], setup["a"], setup["b"]
    cases = [
        ((base, ea, llama.fts[0], "--data", a, "--data", b, "--names", "a,b"), "architecture"),
        ((base, ea, eb, "--data", str(setup["data"]["a"]), "--data", b), "task label"),
        ((base, ea, eb, "--data", a), "no router data for task 'b'"),
        ((base, ea, eb, "--data", a, "--data", b, "--data", f"c={setup['data']['a']}"), "'c'"),
        ((base, ea, eb, "--data", a, "--data", f"b={tmp_path / 'nope.jsonl'}"), "nope"),
        ((base, ea, tmp_path / "missing", "--data", a, "--data", b), "missing"),
        ((base, ea, eb, "--data", a, "--data", b, "--fraction", "0"), "fraction"),
        ((base, ea, eb, "--data", a, "--data", b, "--method", "nope"), "nope"),
        ((base, ea, eb, "--data", a, "--data", b, "--method", "ties", "--shared", ea), "either"),
        ((base, ea, eb, "--data", a, "--data", b, "--param", "density"), "KEY=VALUE"),
        (
            (base, ea, eb, "--data", a, "--data", b, "--method", "ties", "--param", "lambda=nan"),
            "finite",
        ),  # fmt: skip
        ((base, ea, eb, "--data", a, "--data", b, "--method", "fda"), "fda"),
    ]
    for args, needle in cases:
        res = run_cli("twin", "build", *args, "-o", out, "--no-progress")
        one_error_line(res, needle)
        no_leftovers(out)


def test_a_scale_that_is_not_finite_is_refused(tmp_path):
    from taskvec.errors import IncompatibleError
    from taskvec.twin.build import build_twin

    with pytest.raises(IncompatibleError, match="finite"):
        build_twin("base", {"a": "a"}, {"a": "x"}, tmp_path / "out", scale=float("nan"))
    assert not (tmp_path / "out").exists()


def test_theta_star_may_be_any_merge_method(setup: dict, tmp_path: Path) -> None:
    import taskvec as tv

    params = {"density": 0.5, "lambda": 0.7, "weight": 1.0}
    got = build(setup, tmp_path / "ties", "--method", "ties", "--param", "density=0.5",
                "--param", "lambda=0.7", "--param", "weight=1")  # fmt: skip
    config = {
        "merge_method": "ties",
        "base_model": str(setup["base"]),
        "models": [{"model": str(setup["a"])}, {"model": str(setup["b"])}],
        "parameters": params,
    }
    want = load_folder(
        tv.merge(config, tmp_path / "merged", progress=False) and tmp_path / "merged"
    )
    have = load_folder(got)
    for name, t in want.items():
        torch.testing.assert_close(have[name], t, rtol=0, atol=0)
    info = json.loads((got / "twin.json").read_text())
    assert info["shared"].startswith("ties") and info["scale"] is None
