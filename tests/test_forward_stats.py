"""Forward passes, data sources and ``taskvec stats`` (taskvec.forward, taskvec.data,
taskvec.stats) on tiny BERT / Llama models with a word-level tokenizer built here: Gram
matrices and Fisher diagonals against a re-derivation with this file's own hooks and autograd,
every data form, and every bad input as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Family, load_folder, run_cli, tree_digest
from safetensors import safe_open
from test_foundation_errors import one_error_line

from taskvec.data import Example, open_data
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(30)]
TEXTS = [
    " ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + (5 * i) % 9)) for i in range(10)
]


def add_tokenizer(folder: Path) -> Path:
    """A whitespace word-level tokenizer (``[PAD]`` = 0, no special tokens added) in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def token_ids(text: str) -> list[int]:
    return [WORDS.index(w) + 2 for w in text.split()]


def padded(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [token_ids(t) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask


@pytest.fixture(scope="module")
def models(bert: Family, llama: Family, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Folders with tokenizers: the BERT encoder, a BERT classifier (3 labels), a Llama LM."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("forward")
    encoder = add_tokenizer(Path(shutil.copytree(bert.base, root / "encoder")))
    lm = add_tokenizer(Path(shutil.copytree(llama.base, root / "lm")))
    config = BertConfig.from_pretrained(bert.base, num_labels=3)
    torch.manual_seed(7)
    clf = BertForSequenceClassification(config).eval()
    clf.save_pretrained(root / "clf")
    shutil.copy(bert.base / "tokenizer_config.json", root / "clf")
    shutil.copy(bert.base / "special_tokens_map.json", root / "clf")
    return {"encoder": encoder, "clf": add_tokenizer(root / "clf"), "lm": lm}


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"sentence": t, "label": i % 3} for i, t in enumerate(TEXTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stats(model: Path, data: str | Path, out: Path, *args: str) -> dict[str, torch.Tensor]:
    res = run_cli("stats", model, data, "-o", out, "--batch-size", "3", *args)
    assert res.exit_code == 0, res.output
    return load_folder(out)


def metadata(out: Path) -> dict[str, str]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return f.metadata()


def linear_inputs(model: torch.nn.Module, texts: list[str]) -> dict[str, torch.Tensor]:
    """Module name → its input's non-padding rows, float64, from one padded batch."""
    input_ids, mask = padded(texts)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, a, _o, n=n: seen.__setitem__(n, a[0].detach().double()))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return {n: x[mask.bool()] if x.ndim == 3 else x for n, x in seen.items()}


# --- gram --------------------------------------------------------------------------------------
def test_gram_equals_xtx_over_n_with_qkv_shared(models: dict, texts_file: Path, tmp_path: Path):
    from transformers import BertModel

    before = tree_digest(models["encoder"])
    out = tmp_path / "gram"
    got = stats(models["encoder"], f"{texts_file}:sentence", out, "--kind", "gram")
    meta = metadata(out)
    gram_of = json.loads(meta["taskvec.gram_of"])
    model = BertModel.from_pretrained(models["encoder"]).eval()
    inputs = linear_inputs(model, TEXTS)
    want_map = {}
    for name in inputs:
        shared = name.rsplit(".", 1)[0] + ".query" if name.endswith((".key", ".value")) else name
        want_map[f"{name}.weight"] = f"{shared}.weight"
    assert gram_of == want_map
    assert set(got) == set(want_map.values())  # one Gram per distinct input
    for name, x in inputs.items():
        want = x.T @ x / x.shape[0]
        torch.testing.assert_close(
            got[gram_of[f"{name}.weight"]].double(), want, rtol=1e-4, atol=1e-5
        )
    assert inputs["pooler.dense"].shape[0] == len(TEXTS)  # one row per example, not per token
    assert meta["taskvec.kind"] == "statistics" and meta["taskvec.statistics"] == "gram"
    assert meta["taskvec.examples"] == str(len(TEXTS))
    fingerprint = content_fingerprint(open_checkpoint(models["encoder"]))
    assert meta["taskvec.model_fingerprint"] == fingerprint
    assert run_cli("verify", out).exit_code == 0
    assert tree_digest(models["encoder"]) == before


def test_gram_shares_gate_up_and_qkv_in_llama(models: dict, texts_file: Path, tmp_path: Path):
    out = tmp_path / "gram"
    got = stats(models["lm"], texts_file, out, "--kind", "gram", "--column", "sentence")
    gram_of = json.loads(metadata(out)["taskvec.gram_of"])
    for i in range(2):
        layer = f"model.layers.{i}"
        for p in ("q", "k", "v"):
            assert (
                gram_of[f"{layer}.self_attn.{p}_proj.weight"] == f"{layer}.self_attn.q_proj.weight"
            )
        assert gram_of[f"{layer}.mlp.up_proj.weight"] == f"{layer}.mlp.gate_proj.weight"
        assert gram_of[f"{layer}.mlp.down_proj.weight"] == f"{layer}.mlp.down_proj.weight"
    assert gram_of["lm_head.weight"] == "lm_head.weight"
    assert len(got) == 2 * 4 + 1  # qkv, o, gate/up, down per layer, and lm_head


# --- fisher ------------------------------------------------------------------------------------
def classifier_fisher(folder: Path, batch: int | None) -> dict[str, torch.Tensor]:
    """Per example (batch None): (1/N) Σₓ Σ_c p_c (∇ log p_c)². Else FusionBench's
    (1/N) Σ_batches (∇ Σ_x Σ_c √p_c log p_c)² over padded batches of ``batch``."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folder).eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    groups = (
        [[t] for t in TEXTS]
        if batch is None
        else [TEXTS[i : i + batch] for i in range(0, len(TEXTS), batch)]
    )
    for group in groups:
        input_ids, mask = padded(group)
        logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits, -1)
        p = logp.detach().exp()
        if batch is None:
            terms = [(float(p[0, c]), logp[0, c]) for c in range(3)]
        else:
            terms = [(1.0, (p.sqrt() * logp).sum())]
        for weight, objective in terms:
            grads = torch.autograd.grad(objective, list(params.values()), retain_graph=True)
            for n, g in zip(params, grads, strict=True):
                acc[n] += weight * g.double() ** 2
    return {n: a / len(TEXTS) for n, a in acc.items()}


@pytest.mark.parametrize("variant", ["example", "batch"])
def test_fisher_equals_autograd(models: dict, texts_file: Path, tmp_path: Path, variant: str):
    out = tmp_path / "fisher"
    got = stats(
        models["clf"],
        f"{texts_file}:sentence",
        out,
        "--kind",
        "fisher",
        "--fisher-variant",
        variant,
    )
    want = classifier_fisher(models["clf"], None if variant == "example" else 3)
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-3, atol=1e-9)
    meta = metadata(out)
    assert meta["taskvec.statistics"] == "fisher" and "taskvec.gram_of" not in meta


def test_fisher_of_a_causal_lm_is_the_sequence_log_likelihood(
    models: dict, texts_file: Path, tmp_path: Path
):
    from transformers import LlamaForCausalLM

    texts = TEXTS[:4]
    data = tmp_path / "few.txt"
    data.write_text("\n".join(texts) + "\n")
    got = stats(models["lm"], data, tmp_path / "fisher", "--kind", "fisher")
    model = LlamaForCausalLM.from_pretrained(models["lm"]).eval()
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for text in texts:
        ids = torch.tensor([token_ids(text)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        ll = logp.gather(-1, ids[0, 1:, None]).sum()
        for n, g in zip(params, torch.autograd.grad(ll, list(params.values())), strict=True):
            want[n] += g.double() ** 2 / len(texts)
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-3, atol=1e-9)


# --- data --------------------------------------------------------------------------------------
WANT = [Example(t, i % 3) for i, t in enumerate(TEXTS)]


def make_examples() -> list[dict[str, object]]:
    return [{"sentence": t, "label": i % 3} for i, t in enumerate(TEXTS)]


def test_every_data_form_gives_the_examples(
    texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert open_data(f"{texts_file}:sentence").examples() == WANT
    assert open_data(texts_file, column="sentence").examples(4) == WANT[:4]
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("sentence,label\n" + "".join(f"{e.text},{e.label}\n" for e in WANT))
    assert open_data(f"{csv_file}:sentence").examples() == WANT
    txt = tmp_path / "train.txt"
    txt.write_text("\n\n".join(TEXTS) + "\n")
    assert open_data(txt).examples() == [Example(t) for t in TEXTS]
    (tmp_path / "my_data.py").write_text(
        "def rows():\n    return [{'sentence': 'w1 w2', 'label': 1}, ('w3', 0), 'w4']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    got = open_data("my_data:rows", column="sentence").examples()
    assert got == [Example("w1 w2", 1), Example("w3", 0), Example("w4")]
    batches = list(open_data(f"{texts_file}:sentence").batches(4))
    assert [len(b) for b in batches] == [4, 4, 2] and sum(batches, []) == WANT


def test_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(make_examples()).save_to_disk(str(folder))
    assert open_data(folder, column="sentence").examples() == WANT
    whole = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(make_examples())}).save_to_disk(
        str(whole)
    )
    assert open_data(f"{whole / 'train'}:sentence").examples(2) == WANT[:2]
    with pytest.raises(Exception, match="holds splits train; give one split's folder"):
        open_data(whole, column="sentence")


def test_the_callable_source_feeds_stats(
    models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "few_texts.py").write_text(f"def texts():\n    return {TEXTS[:3]!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = stats(models["encoder"], "few_texts:texts", tmp_path / "g", "--kind", "gram")
    assert metadata(tmp_path / "g")["taskvec.examples"] == "3" and got


# --- bad input: one line, nothing written ------------------------------------------------------
def test_bad_inputs_are_one_line(
    models: dict, texts_file: Path, tmp_path: Path, no_leftovers, bert: Family
) -> None:
    from transformers import GPT2Config, GPT2Model

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "numbers.jsonl").write_text('{"text": 3}\n')
    (tmp_path / "data.parquet").write_text("x")
    (tmp_path / "bad_source.py").write_text("def rows():\n    return 3\n")
    no_config = Path(shutil.copytree(models["encoder"], tmp_path / "no-config"))
    (no_config / "config.json").unlink()
    conv1d_only = tmp_path / "gpt2"  # GPT-2's projections are Conv1D, not nn.Linear
    GPT2Model(
        GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(conv1d_only)
    add_tokenizer(conv1d_only)
    cases = [
        (models["encoder"], tmp_path / "missing.jsonl", "gram", "missing.jsonl: no such file"),
        (models["encoder"], tmp_path / "empty.jsonl", "gram", "empty.jsonl: empty file"),
        (
            models["encoder"],
            f"{texts_file}:text",
            "gram",
            "no column 'text'; the columns are sentence, label",
        ),
        (models["encoder"], tmp_path / "numbers.jsonl", "gram", "example 0: text is a int"),
        (models["encoder"], tmp_path / "data.parquet", "gram", "not a data file"),
        (models["encoder"], "bad_source:rows", "gram", "returned a int, not an iterable"),
        (no_config, f"{texts_file}:sentence", "gram", "no config.json"),
        (conv1d_only, f"{texts_file}:sentence", "gram", "no nn.Linear layer"),
        (models["encoder"], "missing.jsonl:text", "gram", "missing.jsonl:text: no such file"),
        (models["encoder"], f"{texts_file}:sentence", "fisher", "Fisher needs a log-likelihood"),
        (bert.base, f"{texts_file}:sentence", "gram", "no tokenizer"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        for model, data, kind, needle in cases:
            out = tmp_path / "out"
            res = run_cli("stats", model, data, "--kind", kind, "-o", out)
            one_error_line(res, needle)
            no_leftovers(out)
    res = run_cli("stats", models["encoder"], texts_file, "--kind", "gram", "-o", models["encoder"])
    one_error_line(res, "already exists")


def test_checkpoint_names_bridge_the_base_model_prefix(models: dict) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from taskvec.forward import checkpoint_names

    config = BertConfig.from_pretrained(models["encoder"], num_labels=3)
    clf, base = BertForSequenceClassification(config), BertModel(config)
    base_names = [n for n, _ in base.named_parameters()]
    clf_names = [n for n, _ in clf.named_parameters()]
    got = checkpoint_names(clf, base_names)  # a head model over a base checkpoint
    assert got == {n: n.removeprefix("bert.") for n in clf_names if n.startswith("bert.")}
    assert checkpoint_names(base, clf_names) == {n: f"bert.{n}" for n in base_names}


# --- statistics into merges ----------------------------------------------------------------------
@pytest.mark.parametrize(("method", "kind"), [("regmean", "gram"), ("fisher", "fisher")])
def test_stats_feed_a_merge(
    llama: Family, texts_file: Path, tmp_path: Path, method: str, kind: str
) -> None:
    """``taskvec stats`` of each fine-tune, then a merge naming them: the formula re-derived
    in numpy from the statistics files; another model's statistics are refused."""
    import numpy as np
    import yaml
    from test_methods_statistics import np_fisher, np_regmean

    fts = [
        add_tokenizer(Path(shutil.copytree(f, tmp_path / f"ft{i}")))
        for i, f in enumerate(llama.fts[:2])
    ]
    folders = [tmp_path / f"{kind}{i}" for i in range(2)]
    held = [
        stats(f, f"{texts_file}:sentence", s, "--kind", kind)
        for f, s in zip(fts, folders, strict=True)
    ]
    cfg = {
        "merge_method": method,
        "models": [
            {"model": str(f), "statistics": str(s)} for f, s in zip(fts, folders, strict=True)
        ],
    }
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    res = run_cli("merge", tmp_path / "m.yml", tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    merged = load_folder(tmp_path / "out")
    gram_of = json.loads(metadata(folders[0]).get("taskvec.gram_of", "{}"))
    weights = [load_folder(f) for f in fts]
    checked = 0
    for name, got in merged.items():
        ws = np.stack([w[name].double().numpy() for w in weights])
        if name in gram_of:
            want = np_regmean(ws, np.stack([h[gram_of[name]].numpy() for h in held]), 0.95)
        elif kind == "fisher" and name in held[0]:
            want = np_fisher(ws, np.stack([h[name].numpy() for h in held]), [1.0, 1.0])
        else:
            want = ws.mean(0)
        checked += name in gram_of or (kind == "fisher" and name in held[0])
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert checked >= 8  # the statistics reached the merge
    cfg["models"] = cfg["models"][::-1]
    cfg["models"][0]["statistics"] = str(folders[0])  # ft1 named with ft0's statistics
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(cfg))
    bad = run_cli("merge", tmp_path / "bad.yml", tmp_path / "bad", "--no-progress")
    one_error_line(bad, "fingerprint")
