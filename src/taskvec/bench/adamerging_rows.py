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

from taskvec.adamerging import AdaSettings, Granularity, adamerging, entropy
from taskvec.algebra import load_model as load_checkpoint_model
from taskvec.bench.encoder import load_encoder, pooled
from taskvec.bench.harness import Bench, Run
from taskvec.bench.results import summary_row
from taskvec.forward import checkpoint_names, length_batches, set_threads
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint

LABELS: dict[str, Granularity] = {"adamerging_task": "task", "adamerging_layer": "layer"}
STEPS = 500
BATCH = 16  # unlabelled inputs per task per step, the paper's batch size


def _learn(bench: Bench, granularity: Granularity, steps: int) -> dict[str, Any]:
    """Run AdaMerging on the benchmark's experts; λ, the losses and the cost."""
    built = bench.built
    set_threads(built.threads)
    torch.manual_seed(bench.seed)
    base = load_checkpoint_model(built.base)
    encoder = load_encoder(built.base, built.base).float()
    names = checkpoint_names(encoder, base.specs)
    theta0 = {pn: base.tensor(cn).float() for pn, cn in names.items()}
    experts = [load_checkpoint_model(built.experts[t].path) for t in bench.tasks]
    vectors = [
        lambda pn, m=m: m.tensor(names[pn]).float() - theta0[pn]  # type: ignore[misc]
        for m in experts
    ]
    heads = [built.heads[t] for t in bench.tasks]
    rng = random.Random(bench.seed)
    inputs = [
        length_batches(
            built.evaluator.tokenizer,
            built.data[task].split("test").head(built.config.test_size).texts,
            BATCH,
            built.config.train.max_len,
            rng,
        )
        for task in bench.tasks
    ]

    def loss(step: int) -> torch.Tensor:
        total = torch.zeros(())
        for head, task_batches in zip(heads, inputs, strict=True):
            ids, mask = task_batches[step % len(task_batches)]
            total = total + entropy(head.logits(pooled(encoder, ids, mask)))
        return total

    start, cpu = time.perf_counter(), time.process_time()
    result = adamerging(encoder, theta0, vectors, loss, AdaSettings(granularity, steps))
    seconds = time.perf_counter() - start
    return {
        "coefficients": result.coefficients.tolist(),
        "groups": result.groups,
        "losses": [round(v, 5) for v in result.losses],
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "threads": built.threads,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }


def _merged(bench: Bench, learned: dict[str, Any]) -> dict[str, torch.Tensor]:
    """θ(λ) = θ₀ + Σᵢ λᵢᵍ τᵢ as an encoder state dict (parameter names of the encoder)."""
    built = bench.built
    base = load_checkpoint_model(built.base)
    encoder = load_encoder(built.base, built.base)
    names = checkpoint_names(encoder, base.specs)
    lam = torch.tensor(learned["coefficients"], dtype=torch.float64)
    experts = [load_checkpoint_model(built.experts[t].path) for t in bench.tasks]
    state = {k: v.float() for k, v in encoder.state_dict().items()}
    for pn, cn in names.items():
        theta0 = base.tensor(cn).float()
        theta = theta0.clone()
        for i, m in enumerate(experts):
            theta += float(lam[i, learned["groups"][pn]]) * (m.tensor(cn).float() - theta0)
        state[pn] = theta
    return state


def _cache_key(bench: Bench, granularity: str, steps: int) -> str:
    built = bench.built
    h = hashlib.sha256(json.dumps([granularity, steps, BATCH, bench.seed]).encode())
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
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Learn λ (cached) and score θ(λ) on test once: the results-JSON entry of ``label``."""
    granularity = LABELS[label]
    path = bench.built.root / "adamerging" / f"{_cache_key(bench, granularity, steps)}.json"
    if path.exists():
        learned = json.loads(path.read_text())
        cached = True
    else:
        echo(f"  {label}: {steps} steps of AdaMerging ({granularity}-wise) on unlabelled test")
        learned = _learn(bench, granularity, steps)
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
        {"granularity": granularity, "steps": steps},
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
        "parameters": {"granularity": granularity, "steps": steps, "lr": 1e-3, "init": 0.3},
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
            "rule": f"no coefficient chosen on validation: λ learned from 0.3 by {steps} Adam "
            f"steps (lr 1e-3, clamped to [0, 1]) minimising the entropy of each task's head on "
            f"batches of {BATCH} unlabelled TEST inputs per task, as the paper; test scored once"
        },
    }
