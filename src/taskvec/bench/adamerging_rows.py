"""The benchmark's AdaMerging rows (Yang et al., ICLR 2024): task-wise and layer-wise
coefficients learned by minimising the entropy of the merged encoder's predictions.

As in the paper, the unlabelled inputs are the TEST split's texts (no label is read), each task
scored with its own expert head (:class:`~taskvec.bench.encoder.Head`, mean pooling) on the one
merged encoder; the loss of a step is Σₜ H(head_t(pooled(θ(λ), batch_t))) with one shuffled
batch of :data:`BATCH` inputs per task. The optimisation is the library's
(:func:`taskvec.adamerging.adamerging`): λ from 0.3, Adam lr 1e-3, clamped to [0, 1], the
task vectors streamed from the expert checkpoints for ⟨∂L/∂θ, τ⟩. There is no coefficient to
choose on validation; test is scored once with the learned λ.

The learned coefficients are cached (``<cache>/adamerging/<key>.json``, keyed by the experts,
the settings and the inputs), so a rerun only rebuilds θ(λ) and scores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

from taskvec.adamerging import AdaSettings, Granularity, Precision, adamerging, entropy
from taskvec.bench.encoder_merge import encoder_merge, split_batches, step_loss
from taskvec.bench.harness import Bench, Run
from taskvec.bench.results import summary_row
from taskvec.forward import set_threads
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint

LABELS: dict[str, Granularity] = {"adamerging_task": "task", "adamerging_layer": "layer"}
STEPS = 500
BATCH = 16  # unlabelled inputs per task per step, the paper's batch size


def _learn(
    bench: Bench, granularity: Granularity, steps: int, precision: Precision = "float32"
) -> dict[str, Any]:
    """Run AdaMerging on the benchmark's experts; λ, the losses and the cost."""
    set_threads(bench.built.threads)
    torch.manual_seed(bench.seed)
    merge = encoder_merge(bench)
    inputs = split_batches(bench, "test", BATCH, random.Random(bench.seed))
    loss = step_loss(merge, inputs, lambda logits, _labels: entropy(logits))  # no label read
    start, cpu = time.perf_counter(), time.process_time()
    result = adamerging(
        merge.encoder,
        merge.theta0,
        merge.vectors,
        loss,
        AdaSettings(granularity, steps, precision=precision),
    )
    seconds = time.perf_counter() - start
    return {
        "coefficients": result.coefficients.tolist(),
        "groups": result.groups,
        "losses": [round(v, 5) for v in result.losses],
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "threads": bench.built.threads,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }


def _merged(bench: Bench, learned: dict[str, Any]) -> dict[str, torch.Tensor]:
    """θ(λ) = θ₀ + Σᵢ λᵢᵍ τᵢ as an encoder state dict (parameter names of the encoder)."""
    merge = encoder_merge(bench)
    lam = torch.tensor(learned["coefficients"], dtype=torch.float64)
    state = {k: v.float() for k, v in merge.encoder.state_dict().items()}
    for pn, theta0 in merge.theta0.items():
        group = learned["groups"][pn]
        state[pn] = theta0 + sum(
            float(lam[i, group]) * tau(pn) for i, tau in enumerate(merge.vectors)
        )
    return state


def _cache_key(bench: Bench, granularity: str, steps: int, precision: Precision) -> str:
    built = bench.built
    settings: list[Any] = [granularity, steps, BATCH, bench.seed]
    settings += [precision] if precision != "float32" else []  # keeps float32 keys stable
    h = hashlib.sha256(json.dumps(settings).encode())
    h.update(content_fingerprint(open_checkpoint(built.base)).encode())
    for task in bench.tasks:
        h.update(content_fingerprint(open_checkpoint(built.experts[task].path)).encode())
        h.update(built.heads[task].fingerprint().encode())
        h.update(built.evaluator.batches(task, "test").digest.encode())
    return h.hexdigest()[:24]


def run_adamerging_row(
    bench: Bench,
    label: str,
    *,
    steps: int = STEPS,
    precision: Precision = "float32",
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Learn λ (cached) and score θ(λ) on test once: the results-JSON entry of ``label``."""
    granularity = LABELS[label]
    key = _cache_key(bench, granularity, steps, precision)
    path = bench.built.root / "adamerging" / f"{key}.json"
    if path.exists():
        learned = json.loads(path.read_text())
        cached = True
    else:
        echo(f"  {label}: {steps} steps of AdaMerging ({granularity}-wise) on unlabelled test")
        learned = _learn(bench, granularity, steps, precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(learned) + "\n")
        os.replace(tmp, path)
        cached = False
    mark = time.perf_counter()
    result = bench.evaluate(_merged(bench, learned), split="test", label=label)
    run = Run(
        label,
        "adamerging",
        {"granularity": granularity, "steps": steps, "precision": precision},
        "test",
        result,
        bench.built.reference("test"),
        learned["seconds"],
        time.perf_counter() - mark,
    )
    echo(f"  {label}: test normalised {run.normalized:.4f} ± {run.normalized_stderr:.4f}")
    lam = torch.tensor(learned["coefficients"])
    losses = learned["losses"]
    return {
        "method": "adamerging",
        "parameters": {
            "granularity": granularity,
            "steps": steps,
            "lr": AdaSettings.lr,
            "init": AdaSettings.init,
            "precision": precision,
        },
        **summary_row(run.result, run.reference),
        "seconds": learned["seconds"],
        "eval_seconds": round(run.eval_seconds, 1),
        "coefficients": {
            t: [round(float(v), 4) for v in lam[i]] for i, t in enumerate(bench.tasks)
        },
        "cost": {
            k: learned[k] for k in ("seconds_per_step", "cpu_seconds", "threads", "peak_rss_gb")
        }
        | {"cached": cached},
        "entropy": {"first_step": losses[0], "last_step": losses[-1]} if losses else {},
        "selection": {
            "rule": f"no coefficient chosen on validation: λ learned from {AdaSettings.init} "
            f"by {steps} Adam steps (lr {AdaSettings.lr}, clamped to [0, 1]) minimising the "
            f"entropy of each task's head on batches of {BATCH} unlabelled TEST inputs per "
            "task, as the paper; test scored once"
        },
    }
