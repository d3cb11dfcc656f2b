"""``taskvec analyze`` on the command line: the report, --dry-run from headers, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Family, run_cli, save_hf, tree_digest
from test_foundation_errors import one_error_line


@pytest.fixture(scope="module")
def wide_llama(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with the same tensor names as the tiny family but a wider MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(llama.base)
    cfg.intermediate_size = 48
    torch.manual_seed(5)
    model = LlamaForCausalLM(cfg)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return save_hf(model, sd, tmp_path_factory.mktemp("wide") / "wide")


def test_cli_writes_report(llama: Family, tmp_path: Path) -> None:
    out = tmp_path / "report"
    before = tree_digest(llama.root)
    res = run_cli("analyze", llama.base, *llama.fts, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "most aligned pair" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json",
        "index.html",
        "taskvec-manifest.json",
    ]
    data = json.loads((out / "analysis.json").read_text())
    assert data["tasks"] == ["llama-ft0", "llama-ft1", "llama-ft2"]
    assert run_cli("verify", out).exit_code == 0  # the report is a verifiable output
    assert tree_digest(llama.root) == before


def test_dry_run_reads_headers_only(
    llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskvec.io.checkpoint import Checkpoint

    def no_read(*_: object, **__: object) -> None:
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", no_read)
    out = tmp_path / "report"
    res = run_cli("analyze", llama.base, *llama.fts[:2], "--spectra", "-o", out, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "task vectors: llama-ft0, llama-ft1" in res.stdout
    assert "spectra:      layers [0, 1]" in res.stdout
    assert "OK: no problems found" in res.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing", ["no-such-model", "no such file or folder"]),
        ("architecture", ["BertModel", "the base is LlamaForCausalLM"]),
        ("shape", ["shape mismatch for tensor", "mlp"]),
        ("exists", ["output already exists"]),
        ("merge-base", ["base_model", "is not the base"]),
        ("top-k", ["--top-k", "percentage"]),
    ],
)
def test_one_line_errors(
    case: str,
    needles: list[str],
    llama: Family,
    bert: Family,
    wide_llama: Path,
    tmp_path: Path,
    no_leftovers: Callable[[Path], None],
) -> None:
    out = tmp_path / "report"
    args: list[str | Path] = [llama.base, llama.fts[0]]
    extra: list[str | Path] = []
    if case == "missing":
        args.append(tmp_path / "no-such-model")
    elif case == "architecture":
        args.append(bert.fts[0])
    elif case == "shape":
        args.append(wide_llama)
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "merge-base":
        cfg = tmp_path / "m.yaml"
        config = {"merge_method": "linear", "base_model": str(bert.base)}
        cfg.write_text(yaml.safe_dump({**config, "models": [{"model": str(llama.fts[1])}]}))
        extra = ["--merge", cfg]
    elif case == "top-k":
        extra = ["--top-k", "5,120"]
    before = tree_digest(llama.root)
    res = run_cli("analyze", *args, "-o", out, "--no-progress", *extra)
    if case == "top-k":  # click's own usage error: exit status 2, the option named
        assert res.exit_code == 2 and all(n in res.stderr for n in needles), res.stderr
    else:
        one_error_line(res, *needles)
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        no_leftovers(out)
    assert tree_digest(llama.root) == before


def test_no_masks_is_one_pass(
    llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--top-k none: no mask overlaps, and every block is evaluated once instead of twice."""
    from taskvec.analyze import stream
    from taskvec.analyze.inputs import open_inputs

    n_blocks = len(stream.blocks(open_inputs(llama.base, llama.fts[:2])))
    calls: list[str] = []
    evaluate = stream.evaluate
    monkeypatch.setattr(stream, "evaluate", lambda v, b: calls.append(b.name) or evaluate(v, b))
    out = tmp_path / "report"
    res = run_cli("analyze", llama.base, *llama.fts[:2], "-o", out, "--top-k", "none")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["pairwise"]["top_k"] == {}
    assert "Jaccard" not in (out / "index.html").read_text()
    assert len(calls) == n_blocks
    calls.clear()
    run_cli("analyze", llama.base, *llama.fts[:2], "-o", out, "--overwrite")
    assert len(calls) == 2 * n_blocks
