"""A remedy tried for AdaMerging's collapse on the benchmark's binary tasks (docs/benchmark.md):
layer-wise AdaMerging with the information-maximisation loss of test-time adaptation
(mean entropy of each prediction minus the entropy of the batch's mean prediction, as in SHOT,
Liang et al., ICML 2020) instead of the entropy alone, which a head predicting one class for
every input also minimises.

    python benchmarks/adamerging_information.py   # ≈ 11 min on 2 idle cores (bfloat16)
"""

from __future__ import annotations

import random
import time

import torch

from taskvec.adamerging import AdaSettings, adamerging
from taskvec.bench import adamerging_rows as rows
from taskvec.bench.encoder_merge import encoder_merge, split_batches, step_loss
from taskvec.bench.harness import Bench
from taskvec.forward import set_threads


def information_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_b H(p_b) − H(mean_b p_b): low for confident predictions that still use every class."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    marginal = p.mean(0)
    return -(p * logp).sum(-1).mean() + (marginal * torch.log(marginal + 1e-12)).sum()


def main() -> None:
    bench = Bench.open("full", threads=2)
    set_threads(2)
    torch.manual_seed(bench.seed)
    merge = encoder_merge(bench)
    inputs = split_batches(bench, "test", rows.BATCH, random.Random(bench.seed))
    loss = step_loss(merge, inputs, lambda logits, _labels: information_loss(logits))
    start = time.perf_counter()
    settings = AdaSettings("layer", rows.STEPS, precision="bfloat16")
    result = adamerging(merge.encoder, merge.theta0, merge.vectors, loss, settings)
    learned = {"coefficients": result.coefficients.tolist(), "groups": result.groups}
    scores = bench.evaluate(rows._merged(bench, learned), split="test", label="ada-information")
    value, se = scores.normalized(bench.built.reference("test"))
    print(f"{time.perf_counter() - start:.0f} s; test normalised {value:.4f} ± {se:.4f}")
    mean = result.coefficients.mean(1).tolist()
    print("mean λ per task:", dict(zip(bench.tasks, mean, strict=True)))


if __name__ == "__main__":
    main()
