"""The benchmark's Twin-Merging rows (Lu et al., NeurIPS 2024, arXiv 2406.15479): θ* = task
arithmetic of the experts (``twin``) or their Iso-C merge (``twin_iso_c``), rank-10 % factors
of θₜ − θ*, a router trained on the validation inputs labelled by task; every test input is
routed on its own (no task label given) and scored with its task's head. Also reported: the
router's task accuracy on test, the factors' bytes, and the seconds per batch of the routed
model against θ* alone (the static merge)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from taskvec.bench.encoder import mean_pool
from taskvec.bench.evaluate import EvalResult, TaskScore
from taskvec.bench.harness import Bench
from taskvec.bench.results import summary_row
from taskvec.twin.build import DEFAULT_FRACTION, DEFAULT_SCALE, build_twin
from taskvec.twin.dynamic import DynamicModel

ROUTER_EXAMPLES = 256
# label: θ*'s merge (None: the paper's task arithmetic at λ = 0.3); twin_iso_c takes the
# static row the benchmark ranks first on validation (Iso-C, α = 3 chosen there)
ROWS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "twin": None,
    "twin_iso_c": ("iso_c", {"alpha": 3.0}),
}


def run_twin(
    bench: Bench,
    *,
    fraction: float = DEFAULT_FRACTION,
    scale: float = DEFAULT_SCALE,
    method: str | None = None,
    parameters: dict[str, Any] | None = None,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Build the twin folder of the bench's experts (θ* by task arithmetic at ``scale``, or by
    ``method`` with ``parameters``) and score it on the test split."""
    built = bench.built
    work = bench.scratch / "twin"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        data = {}
        for t in bench.tasks:
            texts = built.data[t].split("validation").head(ROUTER_EXAMPLES).texts
            path = work / f"{t}.jsonl"
            path.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts))
            data[t] = str(path)
        start = time.perf_counter()
        folder = build_twin(
            built.base,
            {t: built.experts[t].path for t in bench.tasks},
            data,
            work / "twin",
            scale=scale,
            method=method,
            parameters=parameters,
            fraction=fraction,
            examples=ROUTER_EXAMPLES,
            max_len=built.evaluator.max_len,
            progress=False,
        )
        build_seconds = time.perf_counter() - start
        extra = json.loads((folder / "twin.json").read_text())["extra_bytes"]
        scores, routed, timing = score(bench, DynamicModel.load(folder))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = EvalResult(scores)
    row = summary_row(result, built.reference("test"))
    echo(f"  twin: test normalised {row['normalized']:.4f}, router accuracy {routed:.4f}")
    return {
        "method": "twin",
        "parameters": {"fraction": fraction, "scale": scale}
        if method is None
        else {"fraction": fraction, "shared": method, **(parameters or {})},
        **row,
        "seconds": round(build_seconds, 1),
        "router_test_accuracy": round(routed, 4),
        "extra_bytes": extra,
        "seconds_per_batch": timing,
        "selection": {
            "rule": "no coefficient chosen on test: λ and the rank fraction are the defaults; "
            "the router is trained on validation inputs; each test input is routed on its own"
        },
    }


@torch.inference_mode()
def score(bench: Bench, dm: DynamicModel) -> tuple[dict[str, TaskScore], float, dict[str, float]]:
    """Per-task scores of the routed model, the router's task accuracy, and the mean seconds
    per test batch of the routed model and of θ* alone."""
    ev, heads = bench.built.evaluator, bench.built.heads
    scores, hits, total = {}, 0, 0
    seconds = {"static": 0.0, "routed": 0.0}
    n_batches = 0
    for i, task in enumerate(bench.tasks):
        b = ev.batches(task, "test")
        rows = []
        for ids, mask in b.batches:
            mark = time.perf_counter()
            dm.model(input_ids=ids, attention_mask=mask)
            seconds["static"] += time.perf_counter() - mark
            mark = time.perf_counter()
            w = dm.route(ids, mask)
            hidden = dm(ids, mask, weights=w).last_hidden_state
            seconds["routed"] += time.perf_counter() - mark
            rows.append(mean_pool(hidden, mask))
            hits += int((w.argmax(1) == i).sum())
            total += len(ids)
            n_batches += 1
        feats = torch.empty_like(torch.cat(rows))
        feats[torch.tensor(b.order)] = torch.cat(rows)
        correct = heads[task].logits(feats).argmax(-1) == b.labels
        scores[task] = TaskScore(int(correct.sum()), len(b.labels))
    timing = {k: round(v / n_batches, 4) for k, v in seconds.items()}
    return scores, hits / total, timing
