"""PEFT LoRA adapters as task vectors, and extract-lora, checked against PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Family, load_folder, run_cli
from test_foundation_errors import one_error_line

import taskvec as tv
from taskvec.peft_lora import LoraVector, load_adapter
from taskvec.store.store import Store

peft = pytest.importorskip("peft")


def _base_model(llama: Family) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(llama.base).eval()


@pytest.fixture(scope="module")
def adapter(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A LoRA adapter made by PEFT on the llama base (rank and alpha patterns, rsLoRA, an
    embedding adapter, a module to save), and PEFT's own merge of it."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        use_rslora=True,
    )
    model = peft.get_peft_model(_base_model(llama), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("adapter") / "ad"
    model.save_pretrained(folder)
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return folder, merged


def test_adapter_on_its_base_is_peft_merge_and_unload(llama: Family, adapter) -> None:
    folder, merged = adapter
    base = tv.load_model(llama.base)
    got = (base + load_adapter(folder, base)).state_dict()
    assert set(got) == set(merged)
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    changed = [k for k in merged if not torch.equal(merged[k], llama.base_sd[k])]
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed
    assert "model.layers.1.self_attn.v_proj.weight" in changed


def test_tv_load_takes_an_adapter_folder(llama: Family, adapter) -> None:
    folder, merged = adapter
    tau = tv.load(folder)
    assert isinstance(tau, LoraVector)
    assert "lm_head.weight" not in tau.specs  # a saved module needs the base: left out
    name = "model.layers.1.self_attn.q_proj.weight"  # alpha 3 by pattern, rank 4, rsLoRA
    torch.testing.assert_close(
        tau.tensor(name), merged[name] - llama.base_sd[name], rtol=0, atol=1e-6
    )


def test_merge_config_takes_model_plus_adapter(llama: Family, adapter, tmp_path: Path) -> None:
    folder, merged = adapter
    config = {
        "merge_method": "linear",
        "models": [
            {"model": f"{llama.base}+{folder}", "parameters": {"weight": 1.0}},
            {"model": str(llama.fts[0]), "parameters": {"weight": 1.0}},
        ],
    }
    tv.merge(config, tmp_path / "out", progress=False)
    got = load_folder(tmp_path / "out")
    for k, v in merged.items():
        torch.testing.assert_close(got[k], (v + llama.ft_sds[0][k]) / 2, rtol=0, atol=1e-6)


def test_store_add_takes_an_adapter(llama: Family, adapter, tmp_path: Path) -> None:
    folder, merged = adapter
    store = Store(tmp_path / "s", create=True)
    rec = store.add("lora", folder, base=llama.base)
    got = store.vector("lora").state_dict()
    assert rec.base_header is not None
    for k, v in got.items():
        torch.testing.assert_close(v, merged[k] - llama.base_sd[k], rtol=0, atol=1e-6)
    one_error_line(run_cli("store", "add", "x", folder, "--store", store.root), "needs --base")


def _truncated(tau: torch.Tensor, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(tau.double().numpy(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.fixture(scope="module")
def tau0(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tau") / "tau0"
    return (tv.load_model(llama.fts[0]) - tv.load_model(llama.base)).save(out, progress=False)


def test_extract_lora_loads_in_peft_as_the_truncated_vector(
    llama: Family, tau0: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ad"
    res = run_cli("extract-lora", tau0, "-o", out, "--rank", "3")
    assert res.exit_code == 0, res.output
    model = peft.PeftModel.from_pretrained(_base_model(llama), out)
    got = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    base, ft = llama.base_sd, llama.ft_sds[0]
    for k in base:
        if k.endswith("proj.weight") or k == "lm_head.weight":
            want = base[k].double().numpy() + _truncated(ft[k] - base[k], 3)
            np.testing.assert_allclose(got[k].double().numpy(), want, atol=2e-6, err_msg=k)
        else:  # embeddings and norms whole: the fine-tuned weights
            torch.testing.assert_close(got[k], ft[k], rtol=0, atol=1e-6, msg=k)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    norms = [
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    assert config["modules_to_save"] == sorted(["model.embed_tokens", "model.norm", *norms])


def test_extract_lora_sv_epsilon_lowers_ranks_per_module(
    llama: Family, tau0: Path, tmp_path: Path
) -> None:
    tau = tv.load(tau0)
    name = "model.layers.0.mlp.gate_proj.weight"
    s = np.linalg.svd(tau.tensor(name).double().numpy(), compute_uv=False)
    eps = float(s[5] + s[6]) / 2  # gate_proj keeps 6 singular values
    out = tmp_path / "ad"
    res = run_cli("extract-lora", tau0, "-o", out, "--rank", "16", "--sv-epsilon", eps,
                  "--skip-undecomposable")  # fmt: skip
    assert res.exit_code == 0, res.output
    config = json.loads((out / "adapter_config.json").read_text())
    module = name.removesuffix(".weight")
    want = {m: int((np.linalg.svd(tau.tensor(f"{m}.weight").double().numpy(),
                                  compute_uv=False) > eps).sum())
            for m in config["target_modules"]}  # fmt: skip
    assert want[module] == 6
    ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]}
    assert ranks == {m: min(16, r) for m, r in want.items() if r > 0}
    assert config["modules_to_save"] is None
    back = load_adapter(out)  # read back: each module at its own rank, scale 1
    np.testing.assert_allclose(
        back.tensor(name).double().numpy(), _truncated(tau.tensor(name), 6), atol=1e-6
    )


def test_dora_and_foreign_adapters_are_refused(llama: Family, bert: Family, adapter, tmp_path):
    folder, _ = adapter
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (folder / "adapter_model.safetensors").read_bytes()
    )
    out = tmp_path / "out"
    one_error_line(run_cli("apply", llama.base, dora, out), "DoRA")
    res = run_cli("store", "add", "x", folder, "--base", bert.base, "--store", tmp_path / "s")
    one_error_line(res, "adapts", "the base has")
    config = tmp_path / "m.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {llama.base}+{llama.fts[0]}\n")
    one_error_line(run_cli("merge", config, out), "PEFT LoRA adapter folder", str(llama.fts[0]))
    assert not out.exists()


def test_extract_lora_embed_lora_decomposes_embeddings(
    llama: Family, tau0: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ad"
    res = run_cli("extract-lora", tau0, "-o", out, "--rank", "2", "--embed-lora")
    assert res.exit_code == 0, res.output
    model = peft.PeftModel.from_pretrained(_base_model(llama), out)
    got = model.merge_and_unload().state_dict()["model.embed_tokens.weight"].detach()
    name = "model.embed_tokens.weight"
    tau = llama.ft_sds[0][name] - llama.base_sd[name]
    want = llama.base_sd[name].double().numpy() + _truncated(tau, 2)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6)
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["target_modules"]
    assert "model.embed_tokens" not in (config["modules_to_save"] or [])


def test_extract_lora_of_bert_keeps_biases_in_lora_b(bert: Family, tmp_path: Path) -> None:
    from transformers import BertModel

    tau = tv.load_model(bert.fts[0]) - tv.load_model(bert.base)
    tau_dir = tau.save(tmp_path / "tau", progress=False)
    out = tmp_path / "ad"
    assert run_cli("extract-lora", tau_dir, "-o", out, "--rank", "2").exit_code == 0
    model = peft.PeftModel.from_pretrained(BertModel.from_pretrained(bert.base), out)
    got = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    base, ft = bert.base_sd, bert.ft_sds[0]
    for k in base:
        if k.endswith(".weight") and base[k].dim() == 2 and "embeddings" not in k:
            want = base[k].double().numpy() + _truncated(ft[k] - base[k], 2)
            np.testing.assert_allclose(got[k].double().numpy(), want, atol=2e-6, err_msg=k)
        elif base[k].is_floating_point():  # biases (lora_B.bias), norms and embeddings whole
            torch.testing.assert_close(got[k], ft[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True
    base_model = tv.load_model(bert.base)  # read back by taskvec: the same model
    ours = (base_model + load_adapter(out, base_model)).state_dict()
    for k, v in ours.items():
        torch.testing.assert_close(v, got[k], rtol=0, atol=1e-6, msg=k)
