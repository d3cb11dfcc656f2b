"""Benchmark configurations: which tasks, how experts are trained, how much is evaluated.

The "lite" and "full" benchmarks are two presets of the same :class:`BenchConfig`; nothing else
in the harness knows which one runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from taskvec.bench.sources import BenchError
from taskvec.bench.tasks import get_task


@dataclass(frozen=True)
class TrainSettings:
    """How one expert is fine-tuned. Every field is part of the expert's cache key."""

    steps: int = 200
    batch_size: int = 16
    max_len: int = 64
    lr_encoder: float = 5e-5
    lr_head: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_len < 8 or self.warmup < 0:
            raise BenchError(f"invalid training settings: {self}")

    def key(self, *extra: str) -> str:
        """A short hash of these settings and ``extra`` strings (task name, base model...)."""
        blob = json.dumps([dataclasses.asdict(self), *extra], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark: its tasks, the experts' training settings and the evaluation sizes.

    ``test_size`` / ``val_size`` cap the examples evaluated per task (None: the whole split);
    ``probe_train`` is how many training examples the frozen-base linear probe is fitted on.
    An expert must beat that probe on its test split by ``min_margin`` points; a task whose
    expert does not is replaced by the next ``reserve`` task, or, when none is left, dropped as
    long as ``min_tasks`` tasks remain (None: every task must stay; see
    :mod:`~taskvec.bench.build`).
    """

    name: str
    tasks: tuple[str, ...]
    train: TrainSettings = TrainSettings()
    test_size: int | None = None
    val_size: int | None = None
    probe_train: int = 1500
    eval_batch_size: int = 64
    reserve: tuple[str, ...] = ()
    min_margin: float = 3.0
    min_tasks: int | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise BenchError("a benchmark needs at least one task")
        for name in (*self.tasks, *self.reserve):
            get_task(name)
        if set(self.tasks) & set(self.reserve) or len(set(self.tasks)) != len(self.tasks):
            raise BenchError("a task appears twice among the tasks and reserve tasks")

    def replace(self, **changes: Any) -> BenchConfig:
        """A copy with some fields changed; training fields may be given directly too."""
        train_fields = {f.name for f in dataclasses.fields(TrainSettings)}
        train = {k: changes.pop(k) for k in list(changes) if k in train_fields}
        if train:
            changes["train"] = dataclasses.replace(self.train, **train)
        return dataclasses.replace(self, **changes)


LITE = BenchConfig(
    name="lite",
    tasks=("mr", "hedge", "dutch"),
    train=TrainSettings(steps=100, max_len=48),
    test_size=400,
)
FULL = BenchConfig(
    name="full",
    tasks=("mr", "hedge", "spam", "wordnet", "brown", "fortunes", "dutch"),
    # multiples of 24 (2, 6 and 8 classes) keep every prefix balanced; one merged model is
    # scored on 6-7 x 480 test examples: about a minute on an idle core
    test_size=480,
    val_size=144,
    min_tasks=6,
)
PRESETS = {c.name: c for c in (LITE, FULL)}
