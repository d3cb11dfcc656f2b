"""What an output folder holds besides its weights (issue 13): every side file of the base
(sentence-transformers modules, remote code...), a config.json whose per-layer lists follow a
layer-restacking merge, and a model card (README.md) the Hub can read."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import Family, load_folder, run_cli, seeded_noise
from safetensors.torch import save_file
from test_foundation_errors import one_error_line, write_config

import taskvec as tv
from taskvec.errors import ConfigError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.methods import get_method
from taskvec.output_config import restack_layers

# --------------------------------------------------------------------------------------------
# Side files
# --------------------------------------------------------------------------------------------

ST_FILES = {  # a sentence-transformers folder, written by hand (the library is not installed)
    "modules.json": json.dumps(
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Dense",
                "type": "sentence_transformers.models.Dense",
            },
        ]
    ),
    "config_sentence_transformers.json": '{"__version__": {"sentence_transformers": "3.0.1"}}',
    "sentence_bert_config.json": '{"max_seq_length": 64, "do_lower_case": false}',
    "1_Pooling/config.json": '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}',
    "2_Dense/config.json": '{"in_features": 32, "out_features": 8, "bias": true}',
    "generation_config.json": '{"_from_model_config": true}',
    "README.txt": "notes kept with the model\n",
    "assets/deep/notes.md": "a file two folders down\n",
    "vocab.txt": "[PAD]\n[UNK]\n",
}
NOT_COPIED = {  # weights in other formats, exports, hidden files, files taskvec writes itself
    "README.md": "---\nlicense: mit\n---\n# the base's own card MARKER-OF-THE-BASE-CARD\n",
    "tf_model.h5": "not really HDF5",
    "model.gguf": "not really GGUF",
    "onnx/model.onnx": "not really ONNX",
    "onnx/config.json": "{}",
    ".hidden": "secret",
    ".git/HEAD": "ref: refs/heads/main\n",
    "taskvec.json": "{}",
    "__pycache__/modeling.cpython-311.pyc": "bytecode",
}


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _linear(*models: Path) -> dict[str, Any]:
    """An equal-weight linear merge of ``models``."""
    entries = [{"model": str(p), "parameters": {"weight": 1.0}} for p in models]
    return {"merge_method": "linear", "models": entries}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def st_base(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT base as a sentence-transformers folder, with files not to copy, and a
    symbolic link to a file outside it (copied as the file it points to)."""
    root = tmp_path_factory.mktemp("st") / "st-base"
    shutil.copytree(bert.base, root)
    _write_tree(root, {**ST_FILES, **NOT_COPIED})
    dense = {"linear.weight": torch.ones(8, 32), "linear.bias": torch.zeros(8)}
    save_file(dense, str(root / "2_Dense" / "model.safetensors"))
    outside = root.parent / "merges-elsewhere.txt"
    outside.write_text("#version: 0.2\n")
    (root / "merges.txt").symlink_to(outside)
    return root


def _kept_files(root: Path) -> set[str]:
    """The files of ``root`` a copy must hold: all but the weights (top and ``onnx/``) and
    the entries of :data:`NOT_COPIED`."""
    left_out = {n.split("/")[0] for n in NOT_COPIED}
    return {
        rel
        for rel in _files(root)
        if rel.split("/")[0] not in left_out
        and ("/" in rel or not rel.endswith((".safetensors", ".index.json")))
    }


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _weights_and_own(root: Path) -> set[str]:
    """The output's weights and the files taskvec writes (config, card, its own records)."""
    return {
        n
        for n in _files(root)
        if "/" not in n
        and (n.endswith((".safetensors", ".index.json")) or n in ("config.json", "README.md"))
        or n.startswith("taskvec")
    }


def _check_side_files(base: Path, out: Path) -> None:
    kept = _kept_files(base) - {"config.json"}
    assert {"1_Pooling/config.json", "2_Dense/model.safetensors", "merges.txt"} <= kept
    assert _files(out) - _weights_and_own(out) == kept
    for rel in kept:
        assert _sha(out / rel) == _sha(base / rel), rel
    assert not (out / "merges.txt").is_symlink()
    assert "MARKER-OF-THE-BASE-CARD" not in (out / "README.md").read_text()


def test_merge_and_save_copy_every_side_file(st_base: Path, bert: Family, tmp_path: Path) -> None:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(st_base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in bert.fts],
    }
    tv.merge(cfg, tmp_path / "merged", progress=False)
    _check_side_files(st_base, tmp_path / "merged")
    base = tv.load_model(st_base)
    saved = (base + 0.5 * (tv.load_model(bert.fts[0]) - base)).save(
        tmp_path / "api", progress=False
    )
    _check_side_files(st_base, saved)


def test_symbolic_link_loop_is_refused(bert: Family, tmp_path: Path, no_leftovers: Any) -> None:
    base = tmp_path / "looped"
    shutil.copytree(bert.base, base)
    (base / "extra").mkdir()
    (base / "extra" / "back").symlink_to(base, target_is_directory=True)
    res = run_cli(
        "merge",
        write_config(tmp_path / "c.yml", _linear(base)),
        tmp_path / "out",
        "--no-progress",
    )
    one_error_line(res, "extra/back", "symbolic link loop")
    no_leftovers(tmp_path / "out")


def test_hub_cache_snapshot_is_copied_through_its_links(bert: Family, tmp_path: Path) -> None:
    """A Hugging Face cache snapshot (every file a link to a blob): the output holds the
    files' contents under their names, and its card names the repo id."""
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(bert.base.iterdir()):
        blob = repo / "blobs" / hashlib.sha1(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    cfg = _linear(snap, bert.fts[0])
    tv.merge(cfg, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (bert.base / name).read_bytes()
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.base_model == [
        "someone/tiny-bert",
        str(bert.fts[0]),
    ]


REMOTE_CODE = """
import torch
from transformers import PretrainedConfig, PreTrainedModel


class TinyConfig(PretrainedConfig):
    model_type = "taskvec-tiny"

    def __init__(self, hidden=8, num_hidden_layers=2, **kwargs):
        self.hidden = hidden
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(config.hidden, config.hidden) for _ in range(config.num_hidden_layers)
        )
        self.post_init()

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x
"""


def test_remote_code_output_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoConfig, AutoModel, dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    base, ft = tmp_path / "remote-base", tmp_path / "remote-ft"
    config = {
        "model_type": "taskvec-tiny",
        "architectures": ["TinyModel"],
        "hidden": 8,
        "num_hidden_layers": 2,
        "auto_map": {
            "AutoConfig": "modeling_tiny.TinyConfig",
            "AutoModel": "modeling_tiny.TinyModel",
        },
    }
    for folder in (base, ft):
        _write_tree(folder, {"modeling_tiny.py": REMOTE_CODE, "config.json": json.dumps(config)})
    built = AutoModel.from_config(
        AutoConfig.from_pretrained(base, trust_remote_code=True), trust_remote_code=True
    )
    sd = {k: v.detach().contiguous() for k, v in built.state_dict().items()}
    save_file(sd, str(base / "model.safetensors"))
    save_file(seeded_noise(sd, 7, 0.1), str(ft / "model.safetensors"))
    cfg = _linear(base, ft)
    tv.merge(cfg, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "modeling_tiny.py").read_bytes() == (base / "modeling_tiny.py").read_bytes()
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyModel"
    merged = load_folder(out)
    assert not torch.equal(merged["layers.0.weight"], sd["layers.0.weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, merged[name]), name


# --------------------------------------------------------------------------------------------
# Per-layer config lists after a layer-restacking merge
# --------------------------------------------------------------------------------------------


def _tiny_qwen2(folder: Path, seed: int, layer_types: list[str] | None = None) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
        layer_types=layer_types,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Qwen2 models whose two layers are (full, sliding) and (sliding, full)."""
    root = tmp_path_factory.mktemp("qwen2")
    first = _tiny_qwen2(root / "first", 1)
    second = _tiny_qwen2(root / "second", 2, ["sliding_attention", "full_attention"])
    return first, second


def test_passthrough_rebuilds_per_layer_lists(qwen2: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    first, second = qwen2
    assert json.loads((first / "config.json").read_text())["layer_types"] == [
        "full_attention",
        "sliding_attention",
    ]
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(first), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(second), "layer_range": [0, 1]}]},
        ],
    }
    config_file = write_config(tmp_path / "c.yml", cfg)
    dry = run_cli("merge", config_file, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "num_hidden_layers: 2 -> 3" in dry.stdout
    assert (
        'layer_types: ["full_attention", "sliding_attention"] -> '
        '["full_attention", "sliding_attention", "sliding_attention"]'
    ) in dry.stdout
    res = run_cli("merge", config_file, tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    loaded = AutoConfig.from_pretrained(tmp_path / "out")
    # layer 2 is the second model's layer 0, sliding in its config (the first's layer 0 is full)
    assert loaded.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert loaded.num_hidden_layers == 3
    assert loaded.max_window_layers == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    src = load_folder(second)
    got = model.state_dict()
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(got[f"model.layers.2.{suffix}"], src[f"model.layers.0.{suffix}"])


def test_nested_per_layer_lists_follow_their_source_layers() -> None:
    reference = {
        "architectures": ["A", "B"],
        "text_config": {
            "num_hidden_layers": 2,
            "layer_types": ["full", "sliding"],
            "no_rope_layers": [1, 0],
            "eos_token_id": [5, 6],
            "rope_scaling": {"factors": [1.0, 2.0]},
        },
        "vision_config": {"num_hidden_layers": 3, "heads": [1, 2, 3]},
    }
    other = {"text_config": {"num_hidden_layers": 2, "layer_types": ["local", "global"]}}
    out = restack_layers(reference, [(reference, 1), (other, 0), (other, 1), (None, 0)], 2)
    text = out["text_config"]
    assert text["num_hidden_layers"] == 4
    assert text["layer_types"] == ["sliding", "local", "global", "full"]
    # ``other`` has no no_rope_layers: the reference's entry for that layer index
    assert text["no_rope_layers"] == [0, 1, 0, 1]
    assert text["eos_token_id"] == [5, 6] and text["rope_scaling"] == {"factors": [1.0, 2.0]}
    assert out["architectures"] == ["A", "B"] and out["vision_config"] == reference["vision_config"]
    assert reference["text_config"]["layer_types"] == ["full", "sliding"]  # not modified
    with pytest.raises(ConfigError, match="text_config.layer_types"):
        restack_layers(reference, [(other, 5)], 2)


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _yaml_block(text: str) -> Any:
    m = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert m, text
    return yaml.safe_load(m.group(1))


def test_merge_card(llama: Family, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    cfg = {
        "merge_method": "ties",
        "base_model": str(llama.base),
        "models": [
            {"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in llama.fts[:2]
        ],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    tv.merge(cfg, tmp_path / "out", progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == [str(llama.base), *map(str, llama.fts[:2])]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert {"taskvec", "merge", "ties"} <= set(card.data.tags)
    method = get_method("ties")
    assert "## Method: `ties`" in card.text and method.reference in card.text
    assert method.formula in card.text
    assert _yaml_block(card.text) == cfg
    for p in (llama.base, *llama.fts[:2]):
        assert f"`{content_fingerprint(open_checkpoint(p))}`" in card.text
    assert f"taskvec {tv.__version__}" in card.text


def test_saved_model_card(llama: Family, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    base = tv.load_model(llama.base)
    saved = (base + 0.3 * (tv.load_model(llama.fts[1]) - base)).save(tmp_path / "m", progress=False)
    card = ModelCard.load(saved / "README.md")
    assert card.data.base_model == [str(llama.base), str(llama.fts[1])]
    assert card.data.base_model_relation == "merge"
    assert "taskvec" in card.data.tags
    assert f"`{content_fingerprint(open_checkpoint(llama.fts[1]))}`" in card.text
