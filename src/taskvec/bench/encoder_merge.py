"""The benchmark's merge as a differentiable function of its coefficients: one encoder module
that holds θ(λ) = θ₀ + Σᵢ λᵢ τᵢ, the experts' task vectors as functions (read when called),
each task's head, and length-bucketed batches of a split.

Shared by the rows and strategies that optimise λ through the model (AdaMerging's entropy on
unlabelled inputs; the gradient search strategy's cross-entropy on labelled validation inputs)
with :func:`taskvec.adamerging.adamerging`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from taskvec.adamerging import VectorFn
from taskvec.algebra import load_model as load_checkpoint_model
from taskvec.bench.encoder import Head, load_encoder, pooled
from taskvec.bench.harness import Bench
from taskvec.forward import checkpoint_names, length_batches

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, mask, labels


@dataclass
class EncoderMerge:
    """θ₀ and τᵢ by encoder parameter name, the encoder that holds θ(λ), the heads."""

    encoder: torch.nn.Module
    theta0: dict[str, torch.Tensor]
    vectors: list[VectorFn]
    heads: list[Head]
    tasks: list[str]

    def logits(self, task: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s head on the encoder's mean-pooled output."""
        return self.heads[task].logits(pooled(self.encoder, ids, mask))


def encoder_merge(bench: Bench) -> EncoderMerge:
    built = bench.built
    base = load_checkpoint_model(built.base)
    encoder = load_encoder(built.base, built.base).float()
    names = checkpoint_names(encoder, base.specs)
    theta0 = {pn: base.tensor(cn).float() for pn, cn in names.items()}
    experts = [load_checkpoint_model(built.experts[t].path) for t in bench.tasks]
    vectors: list[VectorFn] = [
        lambda pn, m=m: m.tensor(names[pn]).float() - theta0[pn]  # type: ignore[misc]
        for m in experts
    ]
    heads = [built.heads[t] for t in bench.tasks]
    return EncoderMerge(encoder, theta0, vectors, heads, bench.tasks)


def split_batches(
    bench: Bench, split: str, batch_size: int, rng: random.Random
) -> list[list[Batch]]:
    """Per task, length-bucketed shuffled batches of ``split`` (its evaluation size cap) with
    their labels (unused, and never looked at, by an unsupervised loss)."""
    built = bench.built
    size = built.config.test_size if split == "test" else built.config.val_size
    out = []
    for task in bench.tasks:
        examples = built.data[task].split(split).head(size)
        labels = torch.tensor(examples.labels)
        batches = length_batches(
            built.evaluator.tokenizer, examples.texts, batch_size, built.config.train.max_len, rng
        )
        out.append([(ids, mask, labels[rows]) for ids, mask, rows in batches])
    return out


def step_loss(
    merge: EncoderMerge,
    data: list[list[Batch]],
    per_task: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[int], torch.Tensor]:
    """loss(step) = Σₜ per_task(logits of task t's batch for this step, its labels)."""

    def loss(step: int) -> torch.Tensor:
        total = torch.zeros(())
        for t, task_batches in enumerate(data):
            ids, mask, labels = task_batches[step % len(task_batches)]
            total = total + per_task(merge.logits(t, ids, mask), labels)
        return total

    return loss
