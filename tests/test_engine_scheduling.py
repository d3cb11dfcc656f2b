"""The engine: its scheduler (largest job first under a memory cap), jobs that yield their rows
in pieces, and the BLAS thread limits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import load_folder
from threadpoolctl import threadpool_info

from taskvec import blas
from taskvec.engine import (
    Job,
    execute,
    intra_op_threads,
    largest_first,
    memory_budget,
    planned_tensors,
)
from taskvec.errors import NumericError
from taskvec.io.writer import CheckpointWriter


class _Tracker:
    """Records, for each job, what else was running when it started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[int] = []
        self.started: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, size: int) -> int:
        with self.lock:
            self.started.append((size, tuple(self.running)))
            self.running.append(size)
        time.sleep(0.002 * size)
        with self.lock:
            self.running.remove(size)
        return size


def test_every_item_once_largest_first_and_within_the_cap() -> None:
    sizes = [3, 100, 7, 90, 5, 1, 60, 8, 2, 4]
    track = _Tracker()
    done = list(largest_first(track, sizes, lambda s: s, threads=2))
    assert sorted(done) == sorted(sizes)
    assert track.started[0] == (100, ())  # the largest starts first, alone
    cap = memory_budget(sizes, 2)
    assert cap == 100 + 2 * 6  # the largest plus two median jobs
    for size, others in track.started:
        assert not others or size + sum(others) <= cap, (size, others)  # unless alone
    together = [{size, *others} for size, others in track.started]
    assert not any({100, 90} <= pair for pair in together)  # the two largest never together


def test_jobs_of_the_usual_size_run_threads_at_a_time() -> None:
    """Equal jobs (a row-block elementwise merge) must not be serialised by the cap."""
    track = _Tracker()
    list(largest_first(track, [10] * 8, lambda s: s, threads=2))
    assert sum(1 for _, others in track.started if others) >= 3  # pairs: at least every other


def test_one_thread_runs_largest_first_in_the_caller() -> None:
    seen: list[tuple[int, str]] = []
    out = list(
        largest_first(
            lambda s: seen.append((s, threading.current_thread().name)) or s,
            [1, 3, 2],
            lambda s: s,
            threads=1,
        )
    )
    assert out == [3, 2, 1]
    assert {name for _, name in seen} == {threading.current_thread().name}


def test_the_first_failure_propagates_and_stops_the_rest() -> None:
    ran: list[int] = []

    def job(size: int) -> int:
        ran.append(size)
        if size == 50:
            raise ValueError("boom")
        return size

    with pytest.raises(ValueError, match="boom"):
        list(largest_first(job, [50, *range(1, 40)], lambda s: s, threads=2, budget=60))
    assert len(ran) < 40  # the waiting jobs were dropped


def test_an_explicit_budget_serialises_jobs_that_do_not_fit() -> None:
    track = _Tracker()
    list(largest_first(track, [10, 10, 10], lambda s: s, threads=2, budget=10))
    assert all(not others for _, others in track.started)


def _blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_workers_limit_numpy_blas_to_one_thread() -> None:
    with intra_op_threads(1):
        assert _blas_threads() == {1}
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blas_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 23, generator=g, dtype=dtype)
    b = torch.randn(23, 11, generator=g, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(blas.mm(a, b), a @ b, **tol)
    torch.testing.assert_close(blas.mm(a.mT.contiguous().mT, b), a @ b, **tol)  # strided
    out = torch.empty(37, 11, dtype=dtype)
    assert blas.mm(a, b, out=out) is out
    torch.testing.assert_close(out, a @ b, **tol)
    acc = torch.randn(37, 11, generator=g, dtype=dtype)
    want = acc + 0.5 * (a @ b)
    torch.testing.assert_close(blas.addmm_(acc, a, b, alpha=0.5), want, **tol)
    torch.testing.assert_close(blas.gram(b.mT), b.mT @ b, **tol)
    sym = a.mT @ a
    w, v = blas.eigh(sym)
    assert w.dtype == dtype and bool((w[1:] >= w[:-1]).all())
    torch.testing.assert_close(v @ torch.diag(w) @ v.mT, sym, rtol=1e-4, atol=1e-4)
    assert isinstance(blas.mm(a, b), torch.Tensor)
    assert np.shares_memory(blas.mm(a, b, out=out).numpy(), out.numpy())


def _job(compute, shape=(6, 2), rows=None) -> Job:
    return Job("w", shape, torch.float32, 48, 48, compute, rows)


def _execute(tmp_path, jobs):
    out = tmp_path / "out"
    with CheckpointWriter(out, planned_tensors(jobs)) as writer:
        execute(jobs, writer, threads=2, progress=False)
        writer.commit()
    return load_folder(out)


def test_a_job_may_yield_its_rows_in_pieces(tmp_path) -> None:
    full = torch.arange(12.0).reshape(6, 2)
    pieces = _job(lambda: iter([(4, full[4:]), (0, full[:4])]))
    whole = Job("b", (3,), torch.float32, 12, 12, lambda: torch.ones(3))
    got = _execute(tmp_path, [pieces, whole])
    assert torch.equal(got["w"], full) and torch.equal(got["b"], torch.ones(3))


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        (lambda: iter([(0, torch.zeros(6, 3))]), "computed shape"),  # wrong width
        (lambda: iter([(4, torch.zeros(4, 2))]), "outside the planned"),  # past the end
        (lambda: iter([(0, torch.zeros(4, 2))]), "computed 4 of 6"),  # rows missing
        (lambda: torch.zeros(5, 2), "computed 5 of 6"),  # one tensor, too short
    ],
)
def test_pieces_that_do_not_fill_the_tensor_are_refused(tmp_path, compute, message) -> None:
    with pytest.raises(NumericError, match=message):
        _execute(tmp_path, [_job(compute)])
    assert not (tmp_path / "out").exists()  # nothing written in place
