"""Evaluators of a coefficient search: long-lived workers that hold the inputs and the
evaluation data, receive only the searched values, re-merge in memory and score.

One worker runs in this process (:class:`LocalPool`); several run as Ray actors
(:class:`RayPool`): ``ray.init()`` on this machine by default (Ray's embedded local cluster, no
set-up), or an existing cluster by ``address``. Each actor reserves ``threads`` CPUs, and one
GPU when the cluster has them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskvec.merge import merge_tensors
from taskvec.search.errors import SearchError
from taskvec.search.objectives import Candidate, make_objective
from taskvec.search.space import search_space

log = logging.getLogger("taskvec")

OBJECT_STORE_BYTES = 128 * 1024**2


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker is built from: plain data, so it travels to Ray actors."""

    template: dict[str, Any]  # the config with its search markers
    objective: str
    threads: int = 1
    seed: int = 0


class Worker:
    """Holds the objective (and, through the page cache, the inputs); scores points."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.space = search_space(spec.template)
        self.objective = make_objective(spec.objective, spec.threads)

    def config(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The runnable config of a point (the objective's model names resolved)."""
        return self.objective.resolve(self.space.resolve(values))

    def _candidate(self, values: Mapping[str, Any]) -> Candidate:
        merged = merge_tensors(
            self.config(values), threads=self.spec.threads, random_seed=self.spec.seed
        )
        return Candidate(merged.tensors, merged.reference)

    def evaluate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Merge and score one point: ``score``, ``metrics`` and timings, or ``error`` (one
        line) when the merge or the objective failed on this point."""
        try:
            start = time.perf_counter()
            candidate = self._candidate(values)
            merged = time.perf_counter()
            scores = self.objective.score(candidate)
            done = time.perf_counter()
        except Exception as e:  # a failing point fails its trial, not the search
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        return {
            "score": scores.score,
            "metrics": scores.metrics,
            "merge_seconds": merged - start,
            "eval_seconds": done - merged,
        }

    def test(self, values: Mapping[str, Any]) -> dict[str, Any] | None:
        """The objective's held-out scores of one point (scored once, for the best)."""
        scores = self.objective.test(self._candidate(values))
        return None if scores is None else {"score": scores.score, "metrics": scores.metrics}


class LocalPool:
    """One worker in this process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.size = 1
        self._done: list[tuple[Any, dict[str, Any]]] = []

    def submit(self, key: Any, values: Mapping[str, Any]) -> None:
        self._done.append((key, self.worker.evaluate(values)))

    def next_done(self) -> tuple[Any, dict[str, Any]]:
        return self._done.pop(0)

    def test(self, values: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.worker.test(values)

    def close(self) -> None:
        pass


class RayPool:
    """``workers`` Ray actors, each a :class:`Worker`; results as they complete."""

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            raise SearchError("several workers need Ray: pip install ray") from None
        self.ray = ray
        if address is not None:
            check_reachable(address)
        local = {
            "num_cpus": max(workers * spec.threads, 1),
            "object_store_memory": OBJECT_STORE_BYTES,  # only coefficients and scores travel
            "_node_ip_address": "127.0.0.1",
        }
        try:
            ray.init(
                address=address,
                ignore_reinit_error=True,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                **({} if address else local),
            )
        except Exception as e:  # ConnectionError, RuntimeError, ValueError...
            where = address or "this machine"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SearchError(f"cannot start or reach Ray at {where}: {first}") from None
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
        actor = ray.remote(num_cpus=spec.threads, num_gpus=gpus)(Worker)
        self.actors = [actor.remote(spec) for _ in range(workers)]  # type: ignore[attr-defined]
        self.size = workers
        self._idle = list(self.actors)
        self._running: dict[Any, tuple[Any, Any]] = {}  # ref -> (key, actor)
        try:  # an actor that cannot build its objective fails here, before any trial
            ray.get([a.__ray_ready__.remote() for a in self.actors])
        except Exception as e:
            self.close()
            raise SearchError(f"a Ray worker failed to start: {_cause(e)}") from None

    def submit(self, key: Any, values: Mapping[str, Any]) -> None:
        actor = self._idle.pop()
        self._running[actor.evaluate.remote(dict(values))] = (key, actor)

    def next_done(self) -> tuple[Any, dict[str, Any]]:
        (ref,), _ = self.ray.wait(list(self._running), num_returns=1)
        key, actor = self._running.pop(ref)
        self._idle.append(actor)
        try:
            return key, self.ray.get(ref)
        except Exception as e:  # the actor died: the trial fails
            return key, {"error": f"Ray worker failed: {_cause(e)}"}

    def test(self, values: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.ray.get(self.actors[0].test.remote(dict(values)))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.ray.shutdown()


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """One line, at once, when a ``host:port`` (or ``ray://host:port``) Ray address accepts
    no connection; Ray itself would retry for minutes. ``auto`` is left to Ray."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise SearchError(f"Ray address {address!r}: give host:port (or ray://host:port, auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SearchError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def _cause(e: BaseException) -> str:
    """The last line of a (remote) error, which names the original exception."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__
