"""The streaming engine: runs per-tensor jobs with a bounded working set and writes the results.

The engine knows nothing about merge methods or task vectors. A :class:`Job` is "produce the
tensor called *name*, of this shape and dtype" plus a closure that does it; the engine
schedules jobs on a small thread pool (tensor-level parallelism, one intra-op thread per
worker so two workers never oversubscribe the cores), checks each result is finite, and hands
it to a :class:`~taskvec.io.writer.CheckpointWriter` that writes it at its planned offset.
At most ``threads`` jobs are in memory at any time, the largest first, and together they stay
within the largest job's ``work_bytes`` plus ``threads`` median ones, so peak memory is
bounded by the largest tensor's working set plus buffers, independent of the model's size.
Output bytes do not depend on the thread count or the order: each tensor is computed the same
way whichever worker runs it.
"""

from __future__ import annotations

import bisect
import gc
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from taskvec.allocator import keep_freed_memory
from taskvec.blas import blas_threads
from taskvec.errors import NumericError
from taskvec.io.dtypes import computable, dtype_name
from taskvec.io.writer import PlannedTensor

log = logging.getLogger("taskvec")
T = TypeVar("T")
R = TypeVar("R")


# Rows per job of elementwise work: 4 MiB of float32 per input, so a job's buffers stay in the
# CPU caches across its several elementwise passes (a 1.1B task arithmetic merge used ~35 % less
# CPU on its arithmetic than with 16 MiB blocks, and took 4.5-5.8 s instead of 7.8-8.5 s).
CHUNK_ELEMENTS = 1 << 20


JobResult = torch.Tensor | Iterator[tuple[int, torch.Tensor]]


class TensorSink(Protocol):
    """Where results go: a :class:`~taskvec.io.writer.CheckpointWriter` (a folder on disk) or
    a :class:`~taskvec.io.memory_sink.MemorySink` (a dict in memory)."""

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None: ...


@dataclass(frozen=True)
class Job:
    """One output tensor, or the rows ``[start, stop)`` of one: its name, full shape, output
    dtype, cost estimates and how to compute it. The closure returns just those rows, or
    yields them in pieces as ``(first row relative to the job's rows, rows)``, each written as
    soon as it is ready (in the background: a piece must not be modified once yielded)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read_bytes: int
    work_bytes: int
    compute: Callable[[], JobResult]
    rows: tuple[int, int] | None = None

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], *self.shape[1:])

    @property
    def out_bytes(self) -> int:
        return PlannedTensor(self.name, self.out_shape, self.dtype).nbytes


def job_parts(shape: tuple[int, ...], by_rows: bool) -> list[tuple[tuple[int, int] | None, float]]:
    """How to split the work on one tensor: ``(rows, share of its elements)`` per job. With
    ``by_rows`` (elementwise work) a tensor of 2 or more dims is cut along its first axis into
    blocks of at most :data:`CHUNK_ELEMENTS` (at least one row each); otherwise one job."""
    if not by_rows or len(shape) < 2 or shape[0] == 0:
        return [(None, 1.0)]
    step = max(1, CHUNK_ELEMENTS // (math.prod(shape[1:]) or 1))
    return [
        ((r, min(r + step, shape[0])), (min(r + step, shape[0]) - r) / shape[0])
        for r in range(0, shape[0], step)
    ]


def planned_tensors(jobs: Sequence[Job]) -> list[PlannedTensor]:
    """The distinct output tensors of ``jobs``, in order, with their full shapes."""
    seen: dict[str, PlannedTensor] = {}
    for j in jobs:
        seen.setdefault(j.name, PlannedTensor(j.name, j.shape, j.dtype))
    return list(seen.values())


@dataclass(frozen=True)
class PlanSummary:
    """What a run will do, from headers alone."""

    tensors: int
    bytes_in: int
    bytes_out: int
    peak_bytes: int
    threads: int

    def lines(self) -> list[str]:
        return [
            f"tensors:           {self.tensors}",
            f"bytes to read:     {_human(self.bytes_in)}",
            f"bytes to write:    {_human(self.bytes_out)}",
            f"threads:           {self.threads}",
            f"est. peak memory:  {_human(self.peak_bytes)} (working set, excluding Python/torch)",
        ]


@dataclass(frozen=True)
class RunStats:
    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float


def default_threads() -> int:
    """Worker threads to use: the cores this process may run on (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def summarize(jobs: Sequence[Job], threads: int) -> PlanSummary:
    sizes = [j.work_bytes for j in jobs]
    works = sorted(sizes, reverse=True)[: max(threads, 1)]
    return PlanSummary(
        tensors=len({j.name for j in jobs}),
        bytes_in=sum(j.read_bytes for j in jobs),
        bytes_out=sum(j.out_bytes for j in jobs),
        peak_bytes=min(sum(works), memory_budget(sizes, threads)) if works else 0,
        threads=threads,
    )


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count and numpy's BLAS threads (process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with blas_threads(n):
            yield
    finally:
        torch.set_num_threads(before)


def parallel_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None
) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``window`` items in flight.

    Each worker runs with one intra-op torch thread (so ``threads`` is the number of cores
    used). The first exception raised by ``fn`` propagates and the remaining items are
    cancelled.
    """
    keep_freed_memory()
    if threads <= 1:
        with intra_op_threads(1):
            yield from map(fn, items)
        return
    window = window or threads + 1
    with intra_op_threads(1), ThreadPoolExecutor(threads, thread_name_prefix="taskvec") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def memory_budget(sizes: Sequence[int], threads: int) -> int:
    """What :func:`largest_first` lets run or wait in its queue at once by default: the
    largest job plus ``threads`` jobs of the median size."""
    if not sizes:
        return 0
    return max(sizes) + threads * int(statistics.median(sizes))


def largest_first(
    fn: Callable[[T], R],
    items: Sequence[T],
    size: Callable[[T], int],
    threads: int,
    budget: int | None = None,
) -> Iterator[R]:
    """``fn`` over ``items`` on a thread pool, largest ``size`` first, results as they complete.

    Longest-job-first scheduling under a memory cap: up to ``threads + 1`` jobs are in flight
    (one queued, so a worker that finishes starts the next at once), a job is submitted while
    the sizes in flight stay within ``budget`` (default :func:`memory_budget`: the largest
    plus ``threads`` median ones), or when nothing else is in flight, and the largest waiting
    job that fits goes next. So no large job is left to the end while the other workers
    idle, jobs of the usual size run ``threads`` at a time, and two of the largest (a
    model's embedding and output matrices) never run at once: smaller ones fill the other
    workers meanwhile. One intra-op thread per worker; the first exception propagates and
    the waiting items are dropped.
    """
    keep_freed_memory()
    waiting = sorted(items, key=size)  # ascending: the next job is taken from the end
    if threads <= 1 or len(waiting) <= 1:
        with intra_op_threads(1):
            yield from map(fn, reversed(waiting))
        return
    sizes = [size(item) for item in waiting]
    cap = budget if budget is not None else memory_budget(sizes, threads)
    with intra_op_threads(1), ThreadPoolExecutor(threads, thread_name_prefix="taskvec") as pool:
        running: dict[Future[R], int] = {}
        while waiting or running:
            free = cap - sum(running.values())
            while waiting and len(running) <= threads:
                # the largest that fits, or the largest of all when nothing is in flight
                pick = bisect.bisect_right(sizes, free) - 1 if running else len(sizes) - 1
                if pick < 0:
                    break
                item, need = waiting.pop(pick), sizes.pop(pick)
                running[pool.submit(fn, item)] = need
                free -= need
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                if future.exception() is not None:
                    waiting.clear()
                yield future.result()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise if ``tensor`` holds a NaN or an infinity (one reduction pass: min and max
    propagate NaN, so both are finite only when every entry is)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = computable(tensor)  # float8 has no reductions
    low, high = torch.aminmax(values)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        bad = int((~torch.isfinite(values)).sum())
        raise NumericError(
            f"tensor {name!r}: {bad} NaN/Inf value(s) produced in {dtype_name(tensor.dtype)}"
        )


def execute(
    jobs: Sequence[Job],
    writer: TensorSink,
    *,
    threads: int = 1,
    progress: bool = True,
    description: str = "writing",
) -> RunStats:
    """Run every job and write its result, largest first under a memory cap (see
    :func:`largest_first`). Raises on the first failure (the caller aborts)."""
    start = time.perf_counter()
    total = sum(j.out_bytes for j in jobs)
    log.info("%s %d jobs (%s) with %d thread(s)", description, len(jobs), _human(total), threads)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        disable=not progress,
        leave=False,
    )

    def run(job: Job) -> int:
        result = job.compute()
        pieces = [(0, result)] if isinstance(result, torch.Tensor) else result
        first = job.rows[0] if job.rows else 0
        rows = job.out_shape[0] if job.out_shape else 1  # a 0-d tensor counts as one row
        done = 0
        for start, piece in pieces:
            n = piece.shape[0] if piece.dim() else 1
            if piece.dim() != len(job.out_shape) or tuple(piece.shape[1:]) != job.out_shape[1:]:
                raise NumericError(
                    f"tensor {job.name!r}: computed shape {tuple(piece.shape)} != planned "
                    f"{job.out_shape}"
                )
            if not 0 <= start <= start + n <= rows:
                raise NumericError(
                    f"tensor {job.name!r}: computed rows {start}..{start + n} outside the "
                    f"planned {rows}"
                )
            piece = piece.to(job.dtype)
            check_finite(job.name, piece)
            writer.write(job.name, piece, first + start)
            done += n
        if done != rows:
            raise NumericError(f"tensor {job.name!r}: computed {done} of {rows} planned rows")
        return job.out_bytes

    collecting = gc.isenabled()
    gc.disable()  # the jobs make no reference cycles; collections would only rescan the plan
    try:
        for nbytes in largest_first(run, jobs, lambda j: j.work_bytes, threads):
            bar.update(nbytes)
    finally:
        bar.close()
        if collecting:
            gc.enable()
    seconds = time.perf_counter() - start
    stats = RunStats(len(jobs), sum(j.read_bytes for j in jobs), total, seconds)
    log.info(
        "wrote %s in %.1f s (%s/s)", _human(total), seconds, _human(int(total / max(seconds, 1e-9)))
    )
    return stats


def _human(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
