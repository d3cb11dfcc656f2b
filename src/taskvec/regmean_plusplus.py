"""RegMean++ (arXiv 2508.03121): RegMean with each block's inputs taken from the merged model.

RegMean (:mod:`taskvec.methods.regmean`) solves each Linear layer from the Gram matrices of its
inputs in each fine-tuned model run on its own task's data. RegMean++ merges block by block:

1. every tensor outside the repeated blocks (embeddings, final norms, pooler) is the mean of
   the models, as RegMean does with the tensors it has no Gram matrix for;
2. each task's data goes through the merged model up to the first block, whose inputs (hidden
   states and the arguments the model passes to a block: attention mask, positions) are kept;
3. for block l: each model i runs its own block l on task i's kept inputs, hooks give the
   Gram matrices Gᵢ = XᵢᵀXᵢ/N of every Linear input (padding excluded, shared inputs such as
   q/k/v counted once), and the block's Linear weights are merged by RegMean's closed form
   W = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ (its other tensors: the mean); then every task's kept inputs go
   through the *merged* block l and become block l + 1's inputs.

So a block is merged for the inputs it will see in the merged model, not in the experts.
Memory: the T fine-tuned models, the merged one, and each task's kept hidden states
(examples × tokens × width floats per task); the Grams of one block at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taskvec.errors import IncompatibleError
from taskvec.forward import (
    batches,
    checkpoint_names,
    linear_inputs,
    load_model,
    load_tokenizer,
)
from taskvec.io.checkpoint import open_checkpoint
from taskvec.methods.regmean import regmean
from taskvec.stats import GramCollector

log = logging.getLogger("taskvec")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PlusPlusSettings:
    """RegMean's α (off-diagonal scale of each Gram matrix) and how much data each task uses."""

    alpha: float = 0.95
    examples: int = 256
    batch_size: int = 16
    max_length: int = 128


@dataclass
class _Kept:
    """One batch's inputs to the current block: positional and keyword arguments, and the
    token mask (for the Grams, which leave padding out)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: torch.Tensor


class _Stop(Exception):
    """Raised by the hook on the first block: the rest of the forward pass is not needed."""


def blocks_of(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's repeated blocks: its longest ``nn.ModuleList`` (``encoder.layer``,
    ``layers``...), by module path."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise IncompatibleError(f"{type(model).__name__}: no list of blocks to merge block-wise")
    return max(lists, key=lambda item: len(item[1]))


def _first_block_inputs(
    model: torch.nn.Module,
    first: torch.nn.Module,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[_Kept]:
    """What ``model`` passes to its first block for each batch of ``data``."""
    kept: list[_Kept] = []
    mask = torch.ones(0)

    def grab(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kept.append(_Kept(tuple(args), dict(kwargs), mask))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for input_ids, mask in data:
                with contextlib.suppress(_Stop):
                    model(input_ids=input_ids, attention_mask=mask)
    finally:
        handle.remove()
    return kept


def _run_block(block: torch.nn.Module, kept: _Kept) -> torch.Tensor:
    out = block(*kept.args, **kept.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(kept: _Kept, hidden: torch.Tensor) -> _Kept:
    if kept.args:
        return _Kept((hidden, *kept.args[1:]), kept.kwargs, kept.mask)
    return _Kept((), {**kept.kwargs, "hidden_states": hidden}, kept.mask)


def _block_grams(block: torch.nn.Module, inputs: Sequence[_Kept]) -> tuple[Tensors, dict[str, str]]:
    """(Gram of each distinct Linear input of ``block``, Linear weight name → its Gram's key)
    on ``inputs``, names relative to the block."""
    collect = GramCollector(block, {n: n for n, _ in block.named_parameters()})
    with linear_inputs(block, collect), torch.no_grad():
        for kept in inputs:
            collect.start_batch(kept.mask)
            _run_block(block, kept)
    return collect.grams(), collect.gram_of


def _merge_block(
    blocks: Sequence[torch.nn.Module], grams: Sequence[tuple[Tensors, dict[str, str]]], alpha: float
) -> Tensors:
    """The merged parameters of one block: RegMean for Linear weights, the mean otherwise."""
    params = [dict(b.named_parameters()) for b in blocks]
    merged: Tensors = {}
    for name in params[0]:
        stacked = torch.stack([p[name].detach().float() for p in params])
        stats = None
        if all(name in gram_of for _, gram_of in grams):
            stats = torch.stack([g[gram_of[name]] for g, gram_of in grams])
        merged[name] = regmean(stacked, None, alpha=alpha, stats=stats, name=name)
    return merged


def regmean_plusplus(
    base: Path,
    experts: Mapping[str, Path],
    texts: Mapping[str, Sequence[str]],
    settings: PlusPlusSettings,
    echo: Callable[[str], None] = lambda _: None,
) -> Tensors:
    """The merged tensors (by the base checkpoint's names) of ``experts``, each run on its
    own task's ``texts`` (see the module docstring). The base gives the architecture and the
    tokenizer; its weights are not merged."""
    tokenizer = load_tokenizer(base)
    merged = load_model(base, "base")
    models = {t: load_model(p, "base") for t, p in experts.items()}
    path, merged_blocks = blocks_of(merged)
    own_blocks = {t: dict(m.named_modules())[path] for t, m in models.items()}
    for t, b in own_blocks.items():
        if len(b) != len(merged_blocks):
            raise IncompatibleError(
                f"{experts[t]}: {len(b)} blocks, the base has {len(merged_blocks)}"
            )
    with torch.no_grad():  # 1. everything outside the blocks: the mean
        outside = dict(merged.named_parameters())
        for name, param in outside.items():
            if not name.startswith(f"{path}."):
                own = [dict(m.named_parameters())[name].detach().float() for m in models.values()]
                param.copy_(torch.stack(own).mean(0).to(param.dtype))
    kept = {  # 2. each task's inputs to the first block, from the merged model
        t: _first_block_inputs(
            merged,
            merged_blocks[0],
            list(batches(tokenizer, list(texts[t]), settings.batch_size, settings.max_length)),
        )
        for t in experts
    }
    for layer, block in enumerate(merged_blocks):  # 3. block by block
        grams = [_block_grams(own_blocks[t][layer], kept[t]) for t in experts]
        values = _merge_block([own_blocks[t][layer] for t in experts], grams, settings.alpha)
        with torch.no_grad():
            for name, param in block.named_parameters():
                param.copy_(values[name].to(param.dtype))
            kept = {
                t: [_with_hidden(k, _run_block(block, k)) for k in ks] for t, ks in kept.items()
            }
        echo(f"block {layer + 1}/{len(merged_blocks)} merged")
    names = checkpoint_names(merged, open_checkpoint(base).tensors)
    return {names[n]: p.detach().clone() for n, p in merged.named_parameters() if n in names}
