"""Scoring encoders on the benchmark tasks with the experts' heads.

:class:`Evaluator` tokenizes each (task, split) once, sorted by length into padded batches, and
reuses those batches for every encoder it scores. An encoder is a Hugging Face folder (for
example a merge written by ``taskvec merge``), an in-memory state dict or a loaded module; it
is scored on each task with that task's head. With a ``cache`` folder, results are stored under
a hash of the encoder's tensors, the heads and the examples, so scoring the same weights again
is free.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from taskvec.bench.encoder import (
    EncoderSource,
    Head,
    load_encoder,
    pooled,
    state_fingerprint,
)
from taskvec.bench.sources import BenchError
from taskvec.bench.tasks import TaskData
from taskvec.forward import collate, tokenize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TaskScore:
    """``correct`` out of ``n`` examples."""

    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy, sqrt(p(1-p)/n)."""
        p = self.accuracy
        return math.sqrt(p * (1.0 - p) / self.n)


@dataclass(frozen=True)
class EvalResult:
    """Per-task scores of one encoder."""

    scores: dict[str, TaskScore]

    @property
    def average(self) -> float:
        """Unweighted mean of the task accuracies."""
        return sum(s.accuracy for s in self.scores.values()) / len(self.scores)

    @property
    def average_stderr(self) -> float:
        """Standard error of :attr:`average`, the tasks taken as independent."""
        return math.sqrt(sum(s.stderr**2 for s in self.scores.values())) / len(self.scores)

    def normalized(self, reference: EvalResult) -> tuple[float, float]:
        """Normalised accuracy: mean over tasks of accuracy / ``reference`` accuracy (the
        experts'), and its standard error with the reference taken as exact."""
        missing = set(self.scores) - set(reference.scores)
        if missing:
            raise BenchError(f"no reference accuracy for {', '.join(sorted(missing))}")
        ratios, variance = [], 0.0
        for task, s in self.scores.items():
            ref = reference.scores[task].accuracy
            if ref == 0:
                raise BenchError(f"reference accuracy of {task} is zero")
            ratios.append(s.accuracy / ref)
            variance += (s.stderr / ref) ** 2
        return sum(ratios) / len(ratios), math.sqrt(variance) / len(ratios)

    def to_json(self) -> dict[str, list[int]]:
        return {task: [s.correct, s.n] for task, s in self.scores.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[int]]) -> EvalResult:
        return cls({task: TaskScore(int(c), int(n)) for task, (c, n) in data.items()})


def combine(results: Sequence[EvalResult]) -> EvalResult:
    """One result from several with disjoint tasks (e.g. each expert on its own task)."""
    scores: dict[str, TaskScore] = {}
    for r in results:
        scores.update(r.scores)
    return EvalResult(scores)


@dataclass(frozen=True)
class _Batches:
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    order: list[int]  # example index of each row, batches concatenated
    labels: torch.Tensor  # in example order
    digest: str  # hash of the texts and labels


class Evaluator:
    """Scores encoders on ``data`` with per-task heads.

    ``sizes`` caps the examples used per split (e.g. ``{"test": 400}``; a missing split means
    all of it). ``config_from`` is the folder whose config shapes in-memory state dicts
    (normally the base model). Tokenized batches are built once per (task, split).
    """

    def __init__(
        self,
        data: Mapping[str, TaskData],
        tokenizer: PreTrainedTokenizerBase,
        config_from: str | os.PathLike[str],
        *,
        max_len: int,
        sizes: Mapping[str, int | None] | None = None,
        batch_size: int = 64,
        cache: Path | None = None,
        progress: bool = True,
    ) -> None:
        self.data = dict(data)
        self.tokenizer = tokenizer
        self.config_from = Path(config_from)
        self.max_len = max_len
        self.sizes = dict(sizes or {})
        self.batch_size = batch_size
        self.cache = cache
        self.progress = progress
        self._batches: dict[tuple[str, str, int | None], _Batches] = {}

    def batches(self, task: str, split: str, n: int | None = None) -> _Batches:
        """The tokenized batches of the first ``n`` examples of a split (default: its size
        cap), built once."""
        size = n if n is not None else self.sizes.get(split)
        key = (task, split, size)
        if key not in self._batches:
            if task not in self.data:
                raise BenchError(f"the evaluator has no data for task {task!r}")
            examples = self.data[task].split(split).head(size)
            ids = tokenize(self.tokenizer, examples.texts, self.max_len)
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            pad = self.tokenizer.pad_token_id
            batches = [
                collate([ids[i] for i in order[k : k + self.batch_size]], pad)
                for k in range(0, len(order), self.batch_size)
            ]
            digest = hashlib.sha256(
                json.dumps([examples.texts, examples.labels, self.max_len]).encode()
            ).hexdigest()
            self._batches[key] = _Batches(batches, order, torch.tensor(examples.labels), digest)
        return self._batches[key]

    def features(
        self, model: torch.nn.Module, task: str, split: str, n: int | None = None
    ) -> torch.Tensor:
        """Mean-pooled features of the first ``n`` examples of a split, in example order."""
        b = self.batches(task, split, n)
        with torch.inference_mode():
            rows = torch.cat([pooled(model, ids, mask) for ids, mask in b.batches])
        out = torch.empty_like(rows)
        out[torch.tensor(b.order)] = rows
        return out

    def labels(self, task: str, split: str, n: int | None = None) -> torch.Tensor:
        return self.batches(task, split, n).labels

    def evaluate(
        self,
        encoder: EncoderSource,
        heads: Mapping[str, Head],
        *,
        split: str = "test",
        label: str = "",
    ) -> EvalResult:
        """Accuracy of ``encoder`` on every task in ``heads``, each with its own head."""
        model = load_encoder(encoder, self.config_from)
        path = self._cache_path(model, heads, split)
        if path is not None and path.exists():
            return EvalResult.from_json(json.loads(path.read_text()))
        scores = {}
        bar = tqdm(
            heads.items(),
            desc=f"eval {label}".strip(),
            disable=not self.progress,
            leave=False,
            unit="task",
        )
        for task, head in bar:
            predictions = head.logits(self.features(model, task, split)).argmax(-1)
            labels = self.labels(task, split)
            scores[task] = TaskScore(int((predictions == labels).sum()), len(labels))
        result = EvalResult(scores)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result.to_json()) + "\n")
            os.replace(tmp, path)
        return result

    def _cache_path(
        self, model: torch.nn.Module, heads: Mapping[str, Head], split: str
    ) -> Path | None:
        if self.cache is None:
            return None
        h = hashlib.sha256(state_fingerprint(model.state_dict()).encode())
        for task in sorted(heads):
            h.update(
                f"{task}|{heads[task].fingerprint()}|{self.batches(task, split).digest}".encode()
            )
        return self.cache / f"{h.hexdigest()[:24]}.json"
