"""The frozen-base linear probe: logistic regression on mean-pooled base features.

It is the bar every expert has to clear: fine-tuning is only worth merging if it beats a linear
classifier on the frozen base. The regularisation strength is chosen on the validation split.
Results are cached as JSON under ``<cache>/probes``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.bench.encoder import state_fingerprint
from taskvec.bench.evaluate import EvalResult, Evaluator, TaskScore

log = logging.getLogger("taskvec.bench")

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass(frozen=True)
class ProbeResult:
    task: str
    c: float
    validation: TaskScore
    test: TaskScore


def linear_probe(
    evaluator: Evaluator,
    base: torch.nn.Module,
    task: str,
    *,
    train_size: int,
    cache: Path | None = None,
) -> ProbeResult:
    """Fit the probe on the first ``train_size`` training examples of ``task``.

    With ``cache``, the result is stored under a hash of the base's weights and the examples.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    splits = ("train", "validation", "test")
    sizes = {"train": train_size}
    path = None
    if cache is not None:
        digests = [evaluator.batches(task, s, sizes.get(s)).digest for s in splits]
        key = json.dumps([state_fingerprint(base.state_dict()), train_size, C_GRID, digests])
        path = cache / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.exists():
            d = json.loads(path.read_text())
            return ProbeResult(task, d["c"], TaskScore(*d["validation"]), TaskScore(*d["test"]))

    x = {s: evaluator.features(base, task, s, sizes.get(s)).numpy() for s in splits}
    y = {s: evaluator.labels(task, s, sizes.get(s)).numpy() for s in splits}

    def score(model: object, split: str) -> TaskScore:
        correct = int((model.predict(x[split]) == y[split]).sum())  # type: ignore[attr-defined]
        return TaskScore(correct, len(y[split]))

    best = None
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        model.fit(x["train"], y["train"])
        val = score(model, "validation")
        if best is None or val.correct > best[1].correct:
            best = (c, val, model)
    assert best is not None
    c, val, model = best
    result = ProbeResult(task, c, val, score(model, "test"))
    log.info("%s: linear probe C=%g, test accuracy %.3f", task, c, result.test.accuracy)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "c": c,
                    "validation": [val.correct, val.n],
                    "test": [result.test.correct, result.test.n],
                }
            )
            + "\n"
        )
        os.replace(tmp, path)
    return result


def probe_results(results: dict[str, ProbeResult]) -> EvalResult:
    """The probes' test scores as one :class:`EvalResult`."""
    return EvalResult({task: r.test for task, r in results.items()})
