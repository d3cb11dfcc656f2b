"""What a coefficient search maximises: one interface over three kinds of objective.

An objective is named by a string, so a worker process (a Ray actor) can build its own copy:

- ``bench:lite`` / ``bench:full``: the benchmark's tasks (:mod:`taskvec.bench`), the mean
  normalised accuracy on the VALIDATION split, each task's own as a metric ``acc:<task>``;
  :meth:`Objective.test` scores the test split (once, for the best point). Configs may use the
  benchmark's model names (``base``, ``expert:<task>``).
- ``accuracy:<data>``: a classification model's accuracy on a labelled data source
  (:func:`taskvec.data.open_data`: a datasets folder, ``file.jsonl:column``, ...); the merged
  tensors go into the model class its reference folder's config names.
- ``<module>:<function>``: ``function(candidate)`` returns a float, or a dict of floats (the
  main one under ``score``, else their mean); ``candidate`` is a :class:`Candidate`. If the
  function takes a ``split`` keyword it is called once more with ``split="test"`` for the best
  point. For ``per_task`` it names its metrics: ``function.metrics = ("a", "b")``.

A search maximises :attr:`Scores.score`; with ``per_task`` it maximises every metric at once
(a Pareto front).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taskvec.callables import import_callable
from taskvec.errors import ConfigError

BENCH = "bench:"
ACCURACY = "accuracy:"
DATA_LIMIT = 2048  # labelled examples an accuracy objective scores


class ObjectiveError(ConfigError):
    """An objective that cannot be built or did not return a score."""


@dataclass
class Candidate:
    """A merged model in memory, as a callable objective receives it: ``tensors`` by
    checkpoint name and the folder whose config and tokenizer describe it."""

    tensors: dict[str, torch.Tensor]
    reference: Path

    def load(self, head: str = "auto") -> torch.nn.Module:
        """The Hugging Face model of :attr:`reference`'s config holding these tensors."""
        from taskvec.forward import checkpoint_names, load_model

        model = load_model(self.reference, head)  # type: ignore[arg-type]
        names = checkpoint_names(model, self.tensors)
        own = dict(model.named_parameters())
        for pn, p in own.items():  # a parameter left at its initial value would score noise
            cn = names.get(pn)
            if cn is None or tuple(p.shape) != tuple(self.tensors[cn].shape):
                raise ObjectiveError(
                    f"{self.reference}: the merge has no tensor of shape {tuple(p.shape)} for "
                    f"the model's parameter {pn!r}"
                )
        with torch.no_grad():
            for pn, cn in names.items():
                if pn in own:
                    own[pn].copy_(self.tensors[cn])
        return model.eval()


@dataclass
class Scores:
    """One trial's result: the score maximised and every metric."""

    score: float
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """Turns a config into paths (:meth:`resolve`) and a merged model into scores."""

    metrics: tuple[str, ...] = ()

    def resolve(self, config: dict[str, Any]) -> dict[str, Any]:
        return config

    def score(self, candidate: Candidate) -> Scores:
        raise NotImplementedError

    def test(self, candidate: Candidate) -> Scores | None:
        """The held-out score of the chosen point, when the objective has one."""
        return None


class BenchObjective(Objective):
    """The benchmark's validation split (normalised accuracy), test for the final point."""

    def __init__(self, preset: str, threads: int | None = None) -> None:
        from taskvec.bench.harness import Bench

        self.bench = Bench.open(preset, threads=threads, progress=False, echo=lambda s: None)
        self.metrics = tuple(f"acc:{t}" for t in self.bench.tasks)

    def resolve(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.bench.resolve(config)

    def _scores(self, candidate: Candidate, split: str) -> Scores:
        result = self.bench.evaluate(candidate.tensors, split=split, label="search")
        reference = self.bench.built.reference(split)
        per_task = {
            f"acc:{t}": s.accuracy / reference.scores[t].accuracy for t, s in result.scores.items()
        }
        return Scores(result.normalized(reference)[0], per_task)

    def score(self, candidate: Candidate) -> Scores:
        return self._scores(candidate, "validation")

    def test(self, candidate: Candidate) -> Scores | None:
        return self._scores(candidate, "test")


class AccuracyObjective(Objective):
    """Accuracy of the merged classification model on a labelled data source."""

    metrics = ("accuracy",)

    def __init__(self, source: str, batch_size: int = 32, max_length: int = 128) -> None:
        from taskvec.data import open_data

        data = open_data(source)
        if data.label is None:
            raise ObjectiveError(f"{source}: no label column, so no accuracy to search on")
        self.examples = data.examples(DATA_LIMIT)
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, candidate: Candidate) -> Scores:
        from taskvec.forward import batches, load_tokenizer

        model = candidate.load("classification")
        labels = _label_ids(model, [e.label for e in self.examples])
        tokenizer = load_tokenizer(candidate.reference)
        texts = [e.text for e in self.examples]
        predicted = []
        with torch.inference_mode():
            for ids, mask in batches(tokenizer, texts, self.batch_size, self.max_length):
                predicted.append(model(input_ids=ids, attention_mask=mask).logits.argmax(-1))
        accuracy = float((torch.cat(predicted) == labels).float().mean())
        return Scores(accuracy, {"accuracy": accuracy})


def _label_ids(model: torch.nn.Module, labels: list[Any]) -> torch.Tensor:
    """Class indices of ``labels`` (indices, or names in the model config's ``label2id``)."""
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    out = []
    for label in labels:
        if isinstance(label, int):
            out.append(label)
        elif label in label2id:
            out.append(int(label2id[label]))
        else:
            raise ObjectiveError(f"label {label!r} is not a class of the model (label2id)")
    return torch.tensor(out)


class CallableObjective(Objective):
    """``module:function(candidate)`` → a float or a dict of floats."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn: Callable[..., Any] = import_callable(spec, ObjectiveError)
        self.metrics = tuple(getattr(self.fn, "metrics", ()))
        try:
            self.takes_split = "split" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            self.takes_split = False

    def _call(self, candidate: Candidate, **kwargs: Any) -> Scores:
        got = self.fn(candidate, **kwargs)
        if isinstance(got, Mapping):
            metrics = {str(k): _number(self.spec, v) for k, v in got.items()}
            if not metrics:
                raise ObjectiveError(f"{self.spec}: returned an empty dict")
            main = metrics.get("score", sum(metrics.values()) / len(metrics))
            return Scores(main, metrics)
        value = _number(self.spec, got)
        return Scores(value, {"score": value})

    def score(self, candidate: Candidate) -> Scores:
        return self._call(candidate)

    def test(self, candidate: Candidate) -> Scores | None:
        return self._call(candidate, split="test") if self.takes_split else None


def _number(spec: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ObjectiveError(f"{spec}: returned {type(value).__name__}, not a number") from None
    if not math.isfinite(number):
        raise ObjectiveError(f"{spec}: returned {number}, not a finite number")
    return number


def make_objective(spec: str, threads: int | None = None) -> Objective:
    """The objective a string names (see the module docstring); one line if it cannot be
    built (unknown benchmark, data without labels, a function that cannot be imported)."""
    if spec.startswith(BENCH):
        return BenchObjective(spec[len(BENCH) :], threads)
    if spec.startswith(ACCURACY):
        return AccuracyObjective(spec[len(ACCURACY) :])
    if ":" in spec:
        return CallableObjective(spec)
    raise ObjectiveError(
        f"objective {spec!r}: use bench:lite|bench:full, accuracy:<data> or module:function"
    )
