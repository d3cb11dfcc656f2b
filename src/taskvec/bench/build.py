"""``taskvec bench build``: data, experts, probes and the ≥ 3-point check, recorded in a manifest.

:func:`build_benchmark` fetches every task's data, fine-tunes (or reuses) one expert per task,
fits the frozen-base linear probe and scores the expert on its own task. An expert that does not
beat the probe by ``config.min_margin`` points on the test split fails the check; its task is
replaced by the next of ``config.reserve`` (and recorded as replaced); when the reserve runs
out it is dropped if ``config.min_tasks`` tasks still remain, and the build fails otherwise.
Everything is cached (experts, probes and scores), so a rerun, or a run
after an interruption, only does what is missing. The outcome is written to
``<cache>/bench/<config name>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from taskvec.bench.config import BenchConfig
from taskvec.bench.encoder import (
    Head,
    base_model_path,
    folder_fingerprint,
    load_encoder,
)
from taskvec.bench.evaluate import EvalResult, Evaluator, TaskScore
from taskvec.bench.finetune import Expert, build_expert, expert_dir
from taskvec.bench.probe import ProbeResult, linear_probe
from taskvec.bench.sources import BenchError
from taskvec.bench.tasks import TaskData, load_task
from taskvec.cache import cache_dir
from taskvec.forward import load_tokenizer, set_threads

log = logging.getLogger("taskvec.bench")


@dataclass(frozen=True)
class TaskCheck:
    """One task's expert against the frozen-base probe (accuracies on the test split)."""

    task: str
    probe: ProbeResult
    expert_test: TaskScore
    expert_validation: TaskScore
    train_seconds: float
    min_margin: float

    @property
    def margin(self) -> float:
        """Expert minus probe test accuracy, in points."""
        return 100.0 * (self.expert_test.accuracy - self.probe.test.accuracy)

    @property
    def passed(self) -> bool:
        return self.margin >= self.min_margin

    def to_json(self) -> dict[str, Any]:
        return {
            "probe": round(self.probe.test.accuracy, 4),
            "probe_c": self.probe.c,
            "expert": round(self.expert_test.accuracy, 4),
            "margin_points": round(self.margin, 2),
            "passed": self.passed,
            "train_seconds": self.train_seconds,
        }


@dataclass
class Built:
    """A built benchmark: the kept tasks, their data, experts and checks, and an evaluator."""

    config: BenchConfig
    root: Path
    base: Path
    tasks: list[str]
    data: dict[str, TaskData]
    experts: dict[str, Expert]
    checks: dict[str, TaskCheck]  # every task tried, the replaced ones included
    replaced: dict[str, str]  # failed task -> the reserve task that took its place
    evaluator: Evaluator
    threads: int
    seconds: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # failed, no reserve left, enough remain

    @property
    def heads(self) -> dict[str, Head]:
        return {t: self.experts[t].head for t in self.tasks}

    def reference(self, split: str = "test") -> EvalResult:
        """Each expert on its own task: the denominator of normalised accuracy."""
        if split == "test":
            return EvalResult({t: self.checks[t].expert_test for t in self.tasks})
        if split == "validation":
            return EvalResult({t: self.checks[t].expert_validation for t in self.tasks})
        raise BenchError(f"no reference for split {split!r}")

    def probes(self) -> EvalResult:
        return EvalResult({t: self.checks[t].probe.test for t in self.tasks})

    def manifest(self) -> dict[str, Any]:
        return {
            "benchmark": self.config.name,
            "base": str(self.base),
            "tasks": self.tasks,
            "replaced": self.replaced,
            "dropped": self.dropped,
            "experts": {t: str(e.path) for t, e in self.experts.items()},
            "checks": {t: c.to_json() for t, c in self.checks.items()},
            "train": self.config.train.__dict__,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }


def make_evaluator(
    config: BenchConfig,
    data: dict[str, TaskData],
    base: Path,
    root: Path,
    *,
    progress: bool = True,
) -> Evaluator:
    """The evaluator every benchmark step shares (batches are tokenized once per split)."""
    return Evaluator(
        data,
        load_tokenizer(base),
        base,
        max_len=config.train.max_len,
        sizes={"test": config.test_size, "validation": config.val_size},
        batch_size=config.eval_batch_size,
        cache=root / "evals",
        progress=progress,
    )


def build_benchmark(
    config: BenchConfig,
    *,
    cache: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    base: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> Built:
    """Build (or reuse) everything ``config`` needs; see the module docstring."""
    start = time.perf_counter()
    root = cache_dir(cache)
    base = base or base_model_path()
    n_threads = set_threads(threads)
    echo(
        f"bench build {config.name}: {len(config.tasks)} tasks ({', '.join(config.tasks)}), "
        f"{config.train.steps} steps per expert, {n_threads} torch thread(s), cache {root}"
    )
    base_fp = folder_fingerprint(base)
    data: dict[str, TaskData] = {}
    for name in (*config.tasks, *config.reserve):
        data[name] = load_task(name, root)
    mark = time.perf_counter()
    seconds = {"data": mark - start}
    evaluator = make_evaluator(config, data, base, root, progress=progress)
    base_model = load_encoder(base, base)

    queue = list(config.reserve)
    kept: list[str] = []
    experts: dict[str, Expert] = {}
    checks: dict[str, TaskCheck] = {}
    replaced: dict[str, str] = {}
    dropped: list[str] = []
    pending = list(config.tasks)
    train_seconds = 0.0
    while pending:
        name = pending.pop(0)
        fresh = not (expert_dir(root, name, config.train, base_fp) / Head.META).exists()
        expert = build_expert(name, config, root, base, base_fingerprint=base_fp, progress=progress)
        train_seconds += float(expert.meta.get("train_seconds", 0.0)) if fresh else 0.0
        probe = linear_probe(
            evaluator, base_model, name, train_size=config.probe_train, cache=root / "probes"
        )
        own = {name: expert.head}
        check = TaskCheck(
            name,
            probe,
            evaluator.evaluate(expert.path, own, label=f"expert {name}").scores[name],
            evaluator.evaluate(expert.path, own, split="validation").scores[name],
            float(expert.meta.get("train_seconds", 0.0)),
            config.min_margin,
        )
        checks[name] = check
        verdict = "ok" if check.passed else f"below the {config.min_margin:g}-point bar"
        echo(
            f"  {name:<10} expert {100 * check.expert_test.accuracy:5.1f}  probe "
            f"{100 * probe.test.accuracy:5.1f}  margin {check.margin:+5.1f}  {verdict}"
            + ("" if fresh else "  (cached)")
        )
        if check.passed:
            kept.append(name)
            experts[name] = expert
            continue
        if queue:
            replaced[name] = queue.pop(0)
            echo(f"  replacing {name} with {replaced[name]}")
            pending.insert(0, replaced[name])
        elif config.min_tasks is not None and len(kept) + len(pending) >= config.min_tasks:
            dropped.append(name)
            echo(f"  dropping {name}: no reserve task left, {len(kept) + len(pending)} remain")
        else:
            raise BenchError(
                f"the {name} expert beats the base probe by {check.margin:.1f} points, under "
                f"the {config.min_margin:g}-point bar, and no reserve task is left"
            )
    seconds["experts"] = train_seconds
    seconds["checks"] = time.perf_counter() - mark - train_seconds
    seconds["total"] = time.perf_counter() - start
    built = Built(
        config,
        root,
        base,
        kept,
        data,
        experts,
        checks,
        replaced,
        evaluator,
        n_threads,
        seconds,
        dropped,
    )
    path = root / "bench" / f"{config.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(built.manifest(), indent=2) + "\n")
    os.replace(tmp, path)
    echo(f"built {len(kept)} experts in {seconds['total']:.0f} s; manifest {path}")
    return built
