"""The streamed passes of an analysis: every tensor in row blocks, never a whole model in memory.

Pass 1 evaluates, block by block, every task vector and merged model's τ = θ − θ_base (the base
read once per block) and accumulates in float64, per layer (tensors outside the layers form one
more bucket):

* the Gram matrix G_ij = ⟨τ_i, τ_j⟩ (norms, cosines and the PCA all follow from it);
* max |τ_i| and the count of near-zero entries |τ_i| ≤ tol;
* per pair of task vectors, the entries both change (|τ| > tol) and, of those, the ones whose
  signs differ (TIES's sign conflicts, Yadav et al. 2023);
* ‖τ_i‖² per module type (:mod:`taskvec.analyze.kinds`);
* the upper-bits counts of |τ| for the exact top-k masks (:mod:`taskvec.analyze.masks`).

The sums of a block come from compiled loops (:mod:`taskvec.analyze.kernels`) that read it once
per pair of rows, not from one full-size torch temporary per statistic.

Pass 2 reads the task vectors again and counts their top-k masks' intersections exactly. Blocks
run on a thread pool; pass 1's float64 sums are added in a fixed order, so results do not depend
on the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from taskvec.algebra import TaskVector, _Cache
from taskvec.analyze.inputs import Inputs
from taskvec.analyze.kernels import pair_sums
from taskvec.analyze.kinds import KINDS, module_kind
from taskvec.analyze.masks import (
    UPPER_BINS,
    ChunkCounts,
    MaskCounter,
    MaskStats,
    coarse_thresholds,
    magnitude_bits,
    upper_counts,
)
from taskvec.engine import CHUNK_ELEMENTS, default_threads, parallel_map

R = TypeVar("R")


@dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of one tensor (``None``: all of it: a 0-d tensor, or a whole
    matrix for the spectra)."""

    name: str
    rows: tuple[int, int] | None
    numel: int
    bucket: int
    kind: int


def blocks(inputs: Inputs) -> list[Block]:
    """Every analysed tensor cut along its first axis into blocks of ≤ CHUNK_ELEMENTS (one row
    at least)."""
    out = []
    layers = inputs.layout.num_layers
    specs = inputs.vectors[0].specs
    for name in inputs.names:
        shape = specs[name].shape
        layer, _ = inputs.layout.split(name)
        bucket = layers if layer is None else layer
        kind = KINDS.index(module_kind(name))
        if not shape:
            out.append(Block(name, None, 1, bucket, kind))
            continue
        per_row = math.prod(shape[1:])
        step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
        for r in range(0, shape[0], step):
            stop = min(r + step, shape[0])
            out.append(Block(name, (r, stop), (stop - r) * per_row, bucket, kind))
    return out


def evaluate(vectors: list[TaskVector], block: Block) -> torch.Tensor:
    """(V, n) float32: each vector's entries in ``block``, reading each checkpoint once."""
    cache = _Cache(block.rows)
    return torch.stack([v._eval(block.name, cache).reshape(-1).float() for v in vectors])


@dataclass
class _Pass1Block:
    gram: torch.Tensor
    max_abs: torch.Tensor
    near_zero: torch.Tensor
    both: torch.Tensor
    differ: torch.Tensor
    upper: torch.Tensor


@dataclass
class Totals:
    """Pass 1's sums, per bucket b (layer b, or the last: outside the layers)."""

    vectors: int
    tasks: int
    buckets: int
    gram: torch.Tensor = field(init=False)  # (B, V, V) float64
    max_abs: torch.Tensor = field(init=False)  # (B, V)
    near_zero: torch.Tensor = field(init=False)  # (V,) int64
    kind_sq: torch.Tensor = field(init=False)  # (K, V) float64: ‖τ‖² per module type
    both: torch.Tensor = field(init=False)  # (B, T, T) int64: entries both change
    differ: torch.Tensor = field(init=False)  # (B, T, T) int64: ... with opposite signs
    upper: torch.Tensor = field(init=False)  # (T, UPPER_BINS, 2) int64
    numel: int = 0
    masks: list[MaskStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        v, t, b = self.vectors, self.tasks, self.buckets
        self.gram = torch.zeros(b, v, v, dtype=torch.float64)
        self.max_abs = torch.zeros(b, v, dtype=torch.float64)
        self.near_zero = torch.zeros(v, dtype=torch.int64)
        self.kind_sq = torch.zeros(len(KINDS), v, dtype=torch.float64)
        self.both = torch.zeros(b, t, t, dtype=torch.int64)
        self.differ = torch.zeros(b, t, t, dtype=torch.int64)
        self.upper = torch.zeros(t, UPPER_BINS, 2, dtype=torch.int64)


def _pass1_block(vectors: list[TaskVector], tasks: int, tol: float, block: Block) -> _Pass1Block:
    x = evaluate(vectors, block)
    gram, max_abs, near_zero, both, differ = map(torch.from_numpy, pair_sums(x.numpy(), tasks, tol))
    return _Pass1Block(
        gram=gram,
        max_abs=max_abs,
        near_zero=near_zero,
        both=both,
        differ=differ,
        upper=upper_counts(magnitude_bits(x[:tasks])),
    )


def _stream(
    fn: Callable[[Block], R], todo: list[Block], threads: int, bar: tqdm
) -> Iterator[tuple[Block, R]]:
    for block, result in zip(todo, parallel_map(fn, todo, threads), strict=True):
        bar.update(block.numel)
        yield block, result


def run_passes(
    inputs: Inputs,
    *,
    tol: float,
    fractions: tuple[float, ...],
    threads: int | None = None,
    progress: bool = True,
) -> Totals:
    """Both passes (see the module docstring); no ``fractions``: no masks, pass 1 only."""
    threads = threads or default_threads()
    vectors, tasks = inputs.vectors, len(inputs.tasks)
    todo = blocks(inputs)
    totals = Totals(len(vectors), tasks, inputs.layout.num_layers + 1)
    totals.numel = sum(b.numel for b in todo)
    bar_args = {"total": totals.numel, "unit": "param", "unit_scale": True, "leave": False}
    passes = 2 if fractions else 1
    with tqdm(desc=f"analysing (pass 1/{passes})", disable=not progress, **bar_args) as bar:
        for block, r in _stream(lambda b: _pass1_block(vectors, tasks, tol, b), todo, threads, bar):
            totals.gram[block.bucket] += r.gram
            torch.maximum(totals.max_abs[block.bucket], r.max_abs, out=totals.max_abs[block.bucket])
            totals.near_zero += r.near_zero
            totals.kind_sq[block.kind] += r.gram.diagonal()
            totals.both[block.bucket] += r.both
            totals.differ[block.bucket] += r.differ
            totals.upper += r.upper
    if not fractions:
        return totals
    counters = [MaskCounter(coarse_thresholds(totals.upper, totals.numel, f)) for f in fractions]
    task_vectors = vectors[:tasks]

    def count(block: Block) -> list[ChunkCounts]:
        bits = magnitude_bits(evaluate(task_vectors, block))
        return [c.count(bits) for c in counters]

    with tqdm(desc="analysing (pass 2/2)", disable=not progress, **bar_args) as bar:
        for _, found in _stream(count, todo, threads, bar):
            for counter, counts in zip(counters, found, strict=True):
                counter.add(counts)
    totals.masks = [c.finish() for c in counters]
    return totals
