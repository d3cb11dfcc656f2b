"""AdaMerging (:mod:`taskvec.adamerging`) on Hugging Face classification experts, as
``merge_method: adamerging`` runs it: one classification model holds θ(λ); task t's head (the
tensors the base lacks or whose shapes differ) is swapped in functionally for task t's loss."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from taskvec.adamerging import AdaSettings, adamerging, entropy
from taskvec.algebra import load_model as load_checkpoint_model
from taskvec.data import open_data
from taskvec.forward import (
    checkpoint_names,
    length_batches,
    load_model,
    load_tokenizer,
    set_threads,
)

MAX_EXAMPLES = 4096  # unlabelled inputs kept per task, cycled in shuffled batches


def run_adamerging(
    plan: Any,
    out: Path,
    *,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    **_: Any,
) -> Path:
    """Learn λ on the plan's data and write the merged body with ``adamerging.json`` (λ, the
    loss of every step) and each task's head as ``heads/<task>.safetensors`` (its expert's
    tensor names: load it into a classification model with ``strict=False``)."""
    opts = plan.options
    set_threads(threads)
    torch.manual_seed(opts["seed"])
    base = load_checkpoint_model(plan.base)
    experts = {t: load_checkpoint_model(p) for t, p in plan.experts.items()}
    first = next(iter(plan.experts.values()))
    body = load_model(first, "classification")
    tokenizer = load_tokenizer(first)
    shapes = {n: s.shape for n, s in base.specs.items()}
    own = dict(body.named_parameters())
    in_base = {
        pn: cn
        for pn, cn in checkpoint_names(body, shapes).items()
        if tuple(own[pn].shape) == tuple(shapes[cn])
    }
    theta0 = {pn: base.tensor(cn) for pn, cn in in_base.items()}
    vectors, heads, data, names_of = [], [], [], {}
    rng = random.Random(opts["seed"])
    for task, model in experts.items():
        names = names_of[task] = checkpoint_names(body, model.specs)
        vectors.append(lambda pn, m=model, n=names: m.tensor(n[pn]).float() - theta0[pn].float())
        heads.append({pn: model.tensor(names[pn]) for pn in own if pn not in in_base})
        texts = [e.text for e in open_data(plan.data[task]).examples(MAX_EXAMPLES)]
        data.append(length_batches(tokenizer, texts, opts["batch_size"], opts["max_length"], rng))

    def loss(step: int) -> torch.Tensor:
        total = torch.zeros(())
        for head, task_batches in zip(heads, data, strict=True):
            ids, mask, _ = task_batches[step % len(task_batches)]
            kwargs = {"input_ids": ids, "attention_mask": mask}
            total = total + entropy(torch.func.functional_call(body, head, (), kwargs).logits)
        return total

    settings = AdaSettings(
        opts["granularity"],
        opts["steps"],
        opts["lr"],
        opts["init"],
        opts["clamp"],
        opts["precision"],
    )
    result = adamerging(body, theta0, vectors, loss, settings, progress=progress)
    merged = {cn: result.merged[pn].to(base.specs[cn].dtype) for pn, cn in in_base.items()}
    record = {
        "tasks": list(experts),
        "granularity": settings.granularity,
        "groups": result.groups,
        "coefficients": result.coefficients.tolist(),
        "losses": result.losses,
        "settings": opts,
    }
    head_files = {
        f"heads/{task}.safetensors": safetensors_bytes(
            {names_of[task][pn]: t.contiguous() for pn, t in head.items()}
        )
        for (task, head) in zip(experts, heads, strict=True)
    }
    return base.patched(merged).save(
        out,
        overwrite=overwrite,
        threads=threads,
        progress=progress,
        records={"adamerging.json": record, **head_files},
        provenance={
            "method": "adamerging",
            "granularity": settings.granularity,
            "coefficients": dict(zip(experts, result.coefficients.tolist(), strict=True)),
        },
    )
