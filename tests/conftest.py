"""Shared fixtures: tiny transformers models (Llama, BERT) saved sharded, plus plain state dicts.

Every model is built from a config with random weights and fixed seeds; a "fine-tune" is the
base plus small Gaussian noise. Checkpoints are written once per session in every layout the
readers support: sharded safetensors with an index (``save_pretrained(max_shard_size=...)``),
sharded ``pytorch_model.bin`` with its index, a single ``.safetensors`` file and a ``.pt`` file.
The in-memory state dicts (float32) are kept so tests compute expectations directly with torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]

# Small enough that every tiny model is split over several shards.
SHARD_SIZE = "24KB"
NOISE = 0.01

TOKENIZER_CONFIG = {"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}
SPECIAL_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]"}


@dataclass
class Family:
    """A base model and its fine-tunes, on disk and in memory."""

    arch: str
    base: Path
    fts: list[Path]
    base_sd: StateDict
    ft_sds: list[StateDict]
    root: Path
    extra: dict[str, Path] = field(default_factory=dict)


def seeded_noise(sd: StateDict, seed: int, scale: float = NOISE) -> StateDict:
    """``sd`` plus N(0, scale²) noise on every float tensor (a simulated fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
        if v.is_floating_point()
        else v.clone()
        for k, v in sd.items()
    }


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    return LlamaForCausalLM(cfg).eval()


def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(4321)
    return BertModel(cfg).eval()


def _write_side_files(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))


def save_hf(model: torch.nn.Module, sd: StateDict, folder: Path) -> Path:
    """``save_pretrained`` with ``sd`` as the weights, sharded, plus tokenizer side files."""
    # save_pretrained empties the dict it is given: pass a copy
    model.save_pretrained(folder, state_dict=dict(sd), max_shard_size=SHARD_SIZE)  # type: ignore[operator]
    _write_side_files(folder)
    return folder


def save_sharded_bin(sd: StateDict, folder: Path, config_from: Path, shards: int = 3) -> Path:
    """A sharded ``pytorch_model.bin`` folder with its index (what ``save_pretrained`` wrote
    with ``safe_serialization=False`` in transformers 4.x; 5.x writes safetensors only)."""
    folder.mkdir()
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fn = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n].clone() for n in names[i * per : (i + 1) * per]}
        torch.save(part, folder / fn)
        weight_map.update(dict.fromkeys(part, fn))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_bytes((config_from / "config.json").read_bytes())
    _write_side_files(folder)
    return folder


def _family(root: Path, arch: str, build: Callable[[], torch.nn.Module], n_fts: int) -> Family:
    model = build()
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    ft_sds = [seeded_noise(base_sd, 100 + i) for i in range(n_fts)]
    base = save_hf(model, base_sd, root / f"{arch}-base")
    fts = [save_hf(model, sd, root / f"{arch}-ft{i}") for i, sd in enumerate(ft_sds)]
    return Family(arch, base, fts, base_sd, ft_sds, root)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fingerprints (and anything else taskvec caches) go to a folder of the test session's,
    never to the user's ~/.cache/taskvec."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TASKVEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Tiny Llama: base + 3 fine-tunes, each in several safetensors shards."""
    return _family(tmp_path_factory.mktemp("llama"), "llama", _tiny_llama, 3)


@pytest.fixture(scope="session")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Tiny BERT: base + 2 fine-tunes (sharded safetensors), and the same weights as sharded
    ``pytorch_model.bin`` folders and as single ``.safetensors`` / ``.pt`` state-dict files."""
    fam = _family(tmp_path_factory.mktemp("bert"), "bert", _tiny_bert, 2)
    for tag, sd in [("base", fam.base_sd), *[(f"ft{i}", s) for i, s in enumerate(fam.ft_sds)]]:
        fam.extra[f"bin-{tag}"] = save_sharded_bin(sd, fam.root / f"bin-{tag}", fam.base)
        st = fam.root / f"{tag}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
        fam.extra[f"st-{tag}"] = st
        pt = fam.root / f"{tag}.pt"
        torch.save(sd, pt)
        fam.extra[f"pt-{tag}"] = pt
    return fam


# --------------------------------------------------------------------------------------------
# Helpers shared by the test modules
# --------------------------------------------------------------------------------------------


def load_folder(folder: Path) -> StateDict:
    """Every tensor of a safetensors output folder (sharded or not), checking the index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: StateDict = {}
        for fn in sorted(set(weight_map.values())):
            part = load_file(str(folder / fn))
            assert all(weight_map[k] == fn for k in part), f"index disagrees with {fn}"
            out.update(part)
        assert set(out) == set(weight_map)
        return out
    return load_file(str(folder / "model.safetensors"))


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 and mtime of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{p.stat().st_mtime_ns}"
        for p in files
    }


def sibling_names(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir()}


def run_cli(*args: str | Path) -> Result:
    """Invoke ``taskvec ARGS`` in-process, stdout and stderr kept apart."""
    from taskvec.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def formula_bound(*terms: torch.Tensor, ulps: float = 8.0) -> torch.Tensor:
    """Elementwise float32 rounding bound for a sum of the given (absolute) terms."""
    eps = torch.finfo(torch.float32).eps
    return ulps * eps * sum(t.double().abs() for t in terms) + 1e-30  # type: ignore[return-value]


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """``|actual − expected| ≤ bound`` elementwise, with a readable failure."""
    err = (actual.double() - expected.double()).abs()
    worst = float((err - bound).max())
    assert worst <= 0, f"max error {float(err.max()):.3g} exceeds bound by {worst:.3g}"


@pytest.fixture
def no_leftovers() -> Iterator[Callable[[Path], None]]:
    """``check(out)``: ``out`` does not exist and its parent holds no temporary sibling."""

    def check(out: Path) -> None:
        assert not out.exists(), f"{out} was created"
        leftovers = [n for n in sibling_names(out.parent) if n.startswith(f".{out.name}")]
        assert not leftovers, f"temporary folders left behind: {leftovers}"

    yield check


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread (torch, and numpy's BLAS where threadpoolctl is there): fastest for
    small matrices, and steady on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(before)


def call_matrix_method(
    name: str, xs: Any, base: Any, tensor: str | None = None, **params: Any
) -> Any:
    """Call a registered method as the engine does (float32 inputs, globals by name, the
    tensor's name when given); the result as a float64 numpy array."""
    from taskvec.methods import get_method

    m = get_method(name)
    g = {k: params.pop(k, v) for k, v in m.globals.items()}
    assert not params, params
    extra = {"name": tensor} if tensor is not None else {}
    out = m.fn(
        torch.tensor(xs, dtype=torch.float32), torch.tensor(base, dtype=torch.float32), **g, **extra
    )
    assert out.dtype == torch.float32 and tuple(out.shape) == base.shape
    return out.double().numpy()


def f32(x: Any) -> Any:
    """``x`` rounded to float32 and back (what a float32 computation can represent)."""
    return x.astype(np.float32).astype(np.float64)
