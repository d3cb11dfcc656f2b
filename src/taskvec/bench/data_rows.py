"""The benchmark's data-aware rows: RegMean (Jin et al., ICLR 2023) and Fisher merging
(Matena & Raffel, NeurIPS 2022) on per-expert statistics.

Each expert's statistics are computed with the library (:mod:`taskvec.stats`) on the first
:data:`EXAMPLES` examples of its task's TRAIN split (class-balanced prefix, as FusionBench's 256):

- gram: G = XᵀX/N of every Linear input of the expert encoder;
- fisher: the per-example diagonal Fisher of the expert's classifier, encoder + its own task
  head (mean pooling, :class:`~taskvec.bench.encoder.Head`), F = (1/N) Σₓ Σ_c p(c|x)·(∇ log
  p(c|x))², of the encoder's tensors only (the heads are not merged).

Statistics are cached like experts (``<cache>/statistics/<task>-<kind>-<expert hash>``). The
merges run through the ordinary YAML ``statistics:`` key; the one parameter (RegMean α, Fisher
``normalize``) is chosen on validation, test is scored once. AdaMerging's rows, which learn
their coefficients instead, are in :mod:`taskvec.bench.adamerging_rows`.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from taskvec.bench.encoder import Head, pooled
from taskvec.bench.harness import BASE_REF, EXPERT_PREFIX, Bench, Run
from taskvec.bench.results import summary_row
from taskvec.forward import checkpoint_names, load_model, load_tokenizer
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.io.statistics import statistics_metadata
from taskvec.io.writer import CheckpointWriter, planned
from taskvec.stats import StatsSettings, fisher_statistics, gram_statistics

EXAMPLES = 256


@dataclass(frozen=True)
class DataRow:
    """A merge method on statistics, with a validation grid of one global parameter."""

    label: str
    method: str
    kind: str  # the statistics it reads
    grid: dict[str, tuple[Any, ...]]


ROWS = {
    r.label: r
    for r in (
        DataRow("regmean", "regmean", "gram", {"alpha": (0.9, 0.95)}),
        DataRow("fisher", "fisher", "fisher", {"normalize": (False, True)}),
    )
}


class _Classifier(torch.nn.Module):
    """Expert encoder + task head with a ``.logits`` output, the log-likelihood of the Fisher."""

    def __init__(self, encoder: torch.nn.Module, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return SimpleNamespace(
            logits=self.head.logits(pooled(self.encoder, input_ids, attention_mask))
        )


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def expert_statistics(bench: Bench, task: str, kind: str) -> tuple[Path, dict[str, Any]]:
    """The cached ``kind`` statistics folder of ``task``'s expert (computed now if missing)
    and its cost (seconds to compute, bytes)."""
    built = bench.built
    expert = built.experts[task]
    ckpt = open_checkpoint(expert.path)
    fingerprint = content_fingerprint(ckpt)
    folder = (
        built.root / "statistics" / f"{task}-{kind}-n{EXAMPLES}-{fingerprint.split(':')[-1][:12]}"
    )
    cost_file = folder.with_name(folder.name + ".cost.json")
    if cost_file.exists() and folder.is_dir():
        return folder, json.loads(cost_file.read_text())
    start = time.perf_counter()
    texts = built.data[task].split("train").head(EXAMPLES).texts
    settings = StatsSettings(kind=kind, examples=EXAMPLES, max_length=built.config.train.max_len)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(expert.path)
    encoder = load_model(expert.path, "base").float().eval()
    names = checkpoint_names(encoder, ckpt.tensors)
    gram_of: dict[str, str] | None = None
    if kind == "gram":
        tensors, gram_of = gram_statistics(
            encoder, tokenizer, texts, names, settings.batch_size, settings.max_length
        )
    else:
        model = _Classifier(encoder, built.heads[task])
        tensors = fisher_statistics(
            model,
            "classification",
            tokenizer,
            texts,
            {f"encoder.{k}": v for k, v in names.items()},
            settings,
        )
    writer = CheckpointWriter(
        folder,
        planned((k, tuple(t.shape), torch.float32) for k, t in sorted(tensors.items())),
        metadata=statistics_metadata(kind, len(texts), fingerprint, gram_of),
        overwrite=True,
        producer={"operation": f"{kind} statistics", "model": str(expert.path), "data": task},
    )
    with writer:
        for k, t in sorted(tensors.items()):
            writer.write(k, t.contiguous())
        writer.commit()
    cost = {
        "seconds": round(time.perf_counter() - start, 1),
        "bytes": sum(t.numel() * 4 for t in tensors.values()),
        "examples": len(texts),
    }
    cost_file.write_text(json.dumps(cost) + "\n")
    return folder, cost


def _config(bench: Bench, row: DataRow, stats: dict[str, Path], params: dict[str, Any]) -> dict:
    return {
        "merge_method": row.method,
        "base_model": BASE_REF,
        "models": [
            {"model": f"{EXPERT_PREFIX}{t}", "statistics": str(stats[t])} for t in bench.tasks
        ],
        "parameters": params,
        "dtype": "float32",
    }


def run_data_row(
    bench: Bench, label: str, *, echo: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Statistics per expert (cached), the parameter chosen on validation, test scored once:
    the results-JSON entry of row ``label``."""
    row = ROWS[label]
    stats, costs = {}, {}
    for task in bench.tasks:
        stats[task], costs[task] = expert_statistics(bench, task, row.kind)
    ((key, values),) = row.grid.items()
    validation: list[tuple[Any, Run]] = []
    for v in values:
        run = bench.run(_config(bench, row, stats, {key: v}), split="validation", label=label)
        validation.append((v, run))
        echo(f"  {label} {key}={v}: validation normalised {run.normalized:.4f}")
    chosen, _ = max(validation, key=lambda vr: vr[1].normalized)  # ties: the first value
    test = bench.run(_config(bench, row, stats, {key: chosen}), split="test", label=label)
    echo(f"  {label}: test normalised {test.normalized:.4f} ± {test.normalized_stderr:.4f}")
    return {
        "method": row.method,
        "parameters": {key: chosen},
        **summary_row(test.result, test.reference),
        "seconds": round(test.merge_seconds, 1),
        "eval_seconds": round(test.eval_seconds, 1),
        "cost": {
            "statistics": row.kind,
            "statistics_seconds": {t: c["seconds"] for t, c in costs.items()},
            "statistics_bytes": {t: c["bytes"] for t, c in costs.items()},
            "merge_seconds": round(test.merge_seconds, 1),
            "peak_rss_gb": round(_peak_rss_gb(), 2),
            "cached": test.cached,
        },
        "selection": {
            "rule": f"{key} chosen on validation (highest mean normalised accuracy) from "
            f"{list(values)}; statistics on the first {EXAMPLES} training examples per expert",
            "validation": {str(v): round(r.normalized, 4) for v, r in validation},
        },
    }
