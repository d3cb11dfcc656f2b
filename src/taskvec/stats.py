"""Per-tensor statistics of a model on data, written as a statistics folder (``taskvec stats``).

- **gram** (RegMean, Jin et al., ICLR 2023): for every ``nn.Linear``, G = XᵀX / N over the N
  non-padding token positions X of its input (rows of a 2-D input, e.g. a pooler's, count
  one each). Linear layers fed the very same input tensor (q/k/v, gate/up) share one Gram:
  sharing is found from the identity of the input tensor object in the hooks, not from names.
- **fisher** (Matena & Raffel, NeurIPS 2022): the diagonal Fisher of every parameter,
  F = (1/N) Σₓ E_{y∼p_θ(y|x)} (∇_θ log p_θ(y|x))², per example. For a classification head the
  expectation over the C labels is exact (C gradients per example, as the paper's code does);
  for a causal LM y is the example's own tokens (the sequence log-likelihood). Variant
  ``batch`` is FusionBench's: F = (1/N) Σ_batches (∇_θ Σ_{x∈batch} Σ_c √p_c·log p_c)²
  (p detached), the square of batch-summed gradients.

The folder is a normal output (:class:`~taskvec.io.writer.CheckpointWriter`); its safetensors
metadata carries ``taskvec.kind: statistics``, ``taskvec.statistics``, ``taskvec.examples``,
``taskvec.model_fingerprint`` (the content fingerprint of the model) and, for gram,
``taskvec.gram_of``: JSON mapping every Linear weight's checkpoint name to its Gram's key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from taskvec.data import open_data
from taskvec.errors import IncompatibleError
from taskvec.forward import (
    Head,
    batches,
    checkpoint_names,
    head_of,
    linear_inputs,
    linear_modules,
    load_model,
    load_tokenizer,
    model_config,
)
from taskvec.io.checkpoint import check_not_an_input, open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.io.statistics import statistics_metadata
from taskvec.io.writer import CheckpointWriter, check_output_path, planned

Kind = Literal["gram", "fisher"]
KINDS = ("gram", "fisher")
FisherVariant = Literal["example", "batch"]
FISHER_VARIANTS = ("example", "batch")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StatsSettings:
    """What to compute and on how much data."""

    kind: Kind = "gram"
    examples: int = 256
    batch_size: int = 16
    max_length: int = 128
    fisher_variant: FisherVariant = "example"
    head: Head = "auto"


class GramCollector:
    """Hook target accumulating Σ XᵀX (float64) and N per distinct Linear input."""

    def __init__(self, model: torch.nn.Module, names: dict[str, str]) -> None:
        self.weight = {
            m: names[f"{m}.weight"] for m in linear_modules(model) if f"{m}.weight" in names
        }
        self.sums: Tensors = {}
        self.rows: dict[str, int] = {}
        self.gram_of: dict[str, str] = {}
        self.mask = torch.ones(0, 0, dtype=torch.bool)
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # per batch: id(x) -> (x, key)

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self._seen = {}  # holding x keeps its id unique within the batch

    def __call__(self, module_name: str, _module: torch.nn.Linear, x: torch.Tensor) -> None:
        weight = self.weight.get(module_name)
        if weight is None:
            return
        seen = self._seen.get(id(x))
        if seen is not None and seen[0] is x:
            self.gram_of.setdefault(weight, seen[1])
            return
        key = self.gram_of.setdefault(weight, weight)
        self._seen[id(x)] = (x, key)
        tokens = x.ndim == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape)
        rows = (x[self.mask] if tokens else x.reshape(-1, x.shape[-1])).detach().float()
        gram = (rows.T @ rows).double()
        if key in self.sums:
            self.sums[key] += gram
            self.rows[key] += rows.shape[0]
        else:
            self.sums[key], self.rows[key] = gram, rows.shape[0]

    def grams(self) -> Tensors:
        return {k: (s / self.rows[k]).float() for k, s in self.sums.items()}


def gram_statistics(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    names: dict[str, str],
    batch_size: int,
    max_length: int,
) -> tuple[Tensors, dict[str, str]]:
    """(key → G = XᵀX/N, Linear weight checkpoint name → key) of ``model`` on ``texts``;
    ``names`` maps the model's parameter names to the checkpoint's."""
    collect = GramCollector(model, names)
    with linear_inputs(model, collect), torch.no_grad():
        for input_ids, mask in batches(tokenizer, texts, batch_size, max_length):
            collect.start_batch(mask)
            model(input_ids=input_ids, attention_mask=mask)
    return collect.grams(), dict(sorted(collect.gram_of.items()))


def _log_likelihoods(model: Any, head: str, input_ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """Classification: log p(c|x) per example and class, (batch, C). Causal LM: the summed
    log-probability of each example's own next tokens, (batch, 1)."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if head == "classification":
        return logp
    token_logp = logp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    return (token_logp * mask[:, 1:]).sum(1, keepdim=True)


def fisher_statistics(
    model: torch.nn.Module,
    head: str,
    tokenizer: Any,
    texts: Sequence[str],
    names: dict[str, str],
    settings: StatsSettings,
) -> Tensors:
    """Checkpoint name → diagonal Fisher of ``model`` on ``texts`` (see the module docstring)."""
    params = {n: p for n, p in model.named_parameters() if n in names}
    wanted = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}

    def add(objective: torch.Tensor, weight: float, retain: bool) -> None:
        grads = torch.autograd.grad(
            objective, list(params.values()), retain_graph=retain, allow_unused=True
        )
        for n, g in zip(params, grads, strict=True):
            if g is not None:  # a parameter the log-likelihood does not use has F = 0
                acc[n] += weight * g.double().square()

    per_example = settings.fisher_variant == "example"
    size = 1 if per_example else settings.batch_size
    for input_ids, mask in batches(tokenizer, texts, size, settings.max_length):
        ll = _log_likelihoods(model, head, input_ids, mask)
        if not per_example:
            weights = ll.detach().exp().sqrt() if head == "classification" else 1.0
            add((weights * ll).sum(), 1.0, False)
            continue
        probs = ll[0].detach().exp() if head == "classification" else torch.ones(1)
        for c in range(ll.shape[1]):
            add(ll[0, c], float(probs[c]), c + 1 < ll.shape[1])
    return {names[n]: (a / len(texts)).float() for n, a in acc.items()}


def compute_statistics(
    model_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: StatsSettings = StatsSettings(),
    *,
    column: str | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Write the ``settings.kind`` statistics of the model in ``model_dir`` on the first
    ``settings.examples`` examples of ``data`` to the folder ``out``; returns a summary
    (seconds, tensors, bytes). Every input problem is one line before the model runs."""
    begin = time.perf_counter()
    if settings.kind not in KINDS:
        raise IncompatibleError(f"unknown statistics {settings.kind!r}; one of {', '.join(KINDS)}")
    if settings.fisher_variant not in FISHER_VARIANTS:
        raise IncompatibleError(f"unknown Fisher variant {settings.fisher_variant!r}")
    target = Path(out).expanduser().absolute()
    check_output_path(target, overwrite)
    config = model_config(model_dir)
    ckpt = open_checkpoint(model_dir)
    check_not_an_input(target, [ckpt])
    texts = [e.text for e in open_data(data, column).examples(settings.examples)]
    head = head_of(config) if settings.head == "auto" else settings.head
    if settings.kind == "fisher" and head == "base":
        raise IncompatibleError(
            f"{model_dir}: Fisher needs a log-likelihood, so a classification or causal-LM head; "
            f"the config names {config.get('architectures') or 'none'} (pass --head)"
        )
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, head).float()  # half-precision weights upcast exactly
    names = checkpoint_names(model, ckpt.tensors)
    if not any(f"{m}.weight" in names for m in linear_modules(model)):
        raise IncompatibleError(f"{model_dir}: the model has no nn.Linear layer in its checkpoint")
    echo(f"computing {settings.kind} statistics on {len(texts)} examples")
    gram_of: dict[str, str] | None = None
    if settings.kind == "gram":
        tensors, gram_of = gram_statistics(
            model, tokenizer, texts, names, settings.batch_size, settings.max_length
        )
    else:
        tensors = fisher_statistics(model, head, tokenizer, texts, names, settings)
    meta = statistics_metadata(settings.kind, len(texts), content_fingerprint(ckpt), gram_of)
    writer = CheckpointWriter(
        target,
        planned((k, tuple(t.shape), torch.float32) for k, t in sorted(tensors.items())),
        metadata=meta,
        overwrite=overwrite,
        producer={
            "operation": f"{settings.kind} statistics",
            "model": str(Path(model_dir).absolute()),
            "data": str(data),
            "settings": asdict(settings),
        },
    )
    with writer:
        for k, t in sorted(tensors.items()):
            writer.write(k, t.contiguous())
        writer.commit()
    size = sum(t.numel() * 4 for t in tensors.values())
    return {"seconds": time.perf_counter() - begin, "tensors": len(tensors), "bytes": size}
