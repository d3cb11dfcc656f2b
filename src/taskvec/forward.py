"""Running a Hugging Face model in the library: load it from a folder, tokenize, batch, hook.

What the data-aware methods share (statistics, FDA's analysis, the benchmark): a model loaded
from a folder with the head its config names (or the one asked for), its tokenizer, right-padded
batches, forward hooks on every ``nn.Linear`` that receive the layer's input, and the mapping of
the loaded model's parameter names onto the checkpoint's tensor names.

Transformers is imported lazily, so importing this module (and the ``taskvec`` CLI) stays fast.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from taskvec.errors import IncompatibleError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Head = Literal["auto", "base", "classification", "causal-lm"]
HEADS: tuple[str, ...] = ("auto", "base", "classification", "causal-lm")
_AUTO_CLASSES = {
    "base": "AutoModel",
    "classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")

LinearHook = Callable[[str, torch.nn.Linear, torch.Tensor], None]
"""Called with (module name, module, input tensor) on every forward of an ``nn.Linear``."""


def transformers_module() -> Any:
    """``transformers``, offline (every model here is a local folder) and quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise IncompatibleError(
            "running a model needs transformers: pip install 'taskvec[hf]'"
        ) from None

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def idle_cores() -> int:
    """Cores this process may use that are not busy now: usable cores minus the 1-minute load
    average, rounded, at least 1. On a 2-core machine where another job holds a core, 2 torch
    threads are up to 4x slower than 1, so the default must not count busy cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, cores - round(load)))


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (default: :func:`idle_cores`); returns the number used."""
    n = threads or idle_cores()
    torch.set_num_threads(n)
    return n


def model_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a model folder; one line when there is none or it is unreadable."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise IncompatibleError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise IncompatibleError(f"{path}: no model_type, so no architecture to load")
    return config


def head_of(config: dict[str, Any]) -> str:
    """The head a config's ``architectures`` name: classification, causal-lm or base."""
    arch = " ".join(config.get("architectures") or [])
    if "ForSequenceClassification" in arch:
        return "classification"
    if "ForCausalLM" in arch:
        return "causal-lm"
    return "base"


def load_model(folder: str | os.PathLike[str], head: Head = "auto") -> PreTrainedModel:
    """The model of a Hugging Face folder in eval mode, with ``head`` (``auto``: the one its
    config's ``architectures`` names; ``base``: AutoModel, no head)."""
    config = model_config(folder)
    chosen = head_of(config) if head == "auto" else head
    if chosen not in _AUTO_CLASSES:
        raise IncompatibleError(f"unknown head {head!r}; one of {', '.join(HEADS)}")
    auto = getattr(transformers_module(), _AUTO_CLASSES[chosen])
    try:
        model = auto.from_pretrained(str(folder))
    except (ValueError, KeyError) as e:
        raise IncompatibleError(
            f"{folder}: no {chosen} model of type {config['model_type']!r}"
            f" ({str(e).splitlines()[0]})"
        ) from None
    return model.eval()


def load_tokenizer(folder: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model folder (one line when the folder has none)."""
    if not any((Path(folder) / f).exists() for f in _TOKENIZER_FILES):
        raise IncompatibleError(f"{folder}: no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    tokenizer = transformers_module().AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:  # decoders often have none: pad with end-of-sequence
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int
) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_len`` (special tokens included), unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``ids`` to the longest: (input_ids, attention_mask)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


def batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int, max_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of consecutive batches of ``texts``."""
    pad = int(tokenizer.pad_token_id)
    for first in range(0, len(texts), batch_size):
        yield collate(tokenize(tokenizer, texts[first : first + batch_size], max_len), pad)


def length_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_len: int,
    rng: random.Random,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of texts of similar length (sorted by token count, so little padding), in an
    order shuffled by ``rng``: every text once per pass, as in length-bucketed training. Each
    batch is (input_ids, attention_mask, the indices in ``texts`` of its rows)."""
    ids = tokenize(tokenizer, texts, max_len)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    pad = int(tokenizer.pad_token_id)
    out = []
    for k in range(0, len(order), batch_size):
        rows = order[k : k + batch_size]
        out.append((*collate([ids[i] for i in rows], pad), torch.tensor(rows)))
    rng.shuffle(out)
    return out


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@contextmanager
def linear_inputs(model: torch.nn.Module, hook: LinearHook) -> Iterator[None]:
    """Within the block, ``hook(name, module, x)`` receives the input ``x`` of every
    ``nn.Linear`` of ``model`` on each forward pass; the hooks are removed on exit."""
    handles = [
        module.register_forward_hook(lambda m, args, _out, n=name: hook(n, m, args[0]))
        for name, module in linear_modules(model).items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def checkpoint_names(model: PreTrainedModel, names: Iterable[str]) -> dict[str, str]:
    """Parameter name in ``model`` → tensor name in a checkpoint holding ``names``, whichever
    side carries the base-model prefix (``bert.`` for a head model saved without its head, and
    the other way round). Parameters the checkpoint lacks (a new head) are left out."""
    have = set(names)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    found: dict[str, str] = {}
    for name, _ in model.named_parameters():
        candidates = [name, prefix + name]
        if prefix and name.startswith(prefix):
            candidates.append(name[len(prefix) :])
        hit = next((c for c in candidates if c in have), None)
        if hit is not None:
            found[name] = hit
    return found
