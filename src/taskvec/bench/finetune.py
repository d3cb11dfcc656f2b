"""Fine-tuning one expert per task: the encoder (word embeddings frozen) plus a linear head.

An expert is a standard Hugging Face folder (``config.json``, ``model.safetensors``, the base's
tokenizer files) that loads with ``AutoModel`` / ``AutoTokenizer``, plus ``head.safetensors``
and ``head.json``. Experts live under ``<cache>/experts/<task>-<key>``, where the key hashes the
training settings and the base model, so an expert built with the same settings is reused.
The folder is written under a temporary name and renamed when complete, so an interrupted
build leaves nothing half-written behind and resumes with the next missing expert.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from taskvec.bench.config import BenchConfig, TrainSettings
from taskvec.bench.encoder import (
    Head,
    copy_tokenizer,
    folder_fingerprint,
    load_encoder,
    pooled,
)
from taskvec.bench.tasks import PARSER_VERSION, TaskData, get_task, load_task
from taskvec.forward import collate, load_tokenizer, tokenize

log = logging.getLogger("taskvec.bench")


@dataclass(frozen=True)
class Expert:
    """A built expert: its encoder folder, its task head and what ``head.json`` records."""

    task: str
    path: Path
    head: Head
    meta: dict[str, Any]


def load_expert(path: str | os.PathLike[str]) -> Expert:
    head = Head.load(path)
    meta = json.loads((Path(path) / Head.META).read_text())
    return Expert(head.task, Path(path), head, meta)


def expert_dir(root: Path, task: str, settings: TrainSettings, base_fingerprint: str) -> Path:
    """Where the expert of ``task`` lives: keyed by the settings, the base and the task's data."""
    t = get_task(task)
    data = f"parser v{PARSER_VERSION}, {t.per_class}/{t.test_per_class}/{t.val_per_class}"
    return root / "experts" / f"{task}-{settings.key(task, base_fingerprint, data)}"


def _lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``steps``."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    return max(0.0, (settings.steps - step) / max(1, settings.steps - settings.warmup))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless mini-batches of indices: a fresh permutation every epoch."""
    last = max(n - batch_size, 0)  # the last full batch starts here; a short epoch is one batch
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, last + 1, batch_size):
            yield order[i : i + batch_size]


def train_expert(
    data: TaskData,
    base: Path,
    out: Path,
    settings: TrainSettings,
    *,
    progress: bool = True,
) -> Expert:
    """Fine-tune ``base`` on ``data.train`` and write the expert folder ``out``."""
    task = data.task
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(base)
    model = load_encoder(base, base).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, len(task.classes))
    encoder_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": encoder_params, "lr": settings.lr_encoder},
            {"params": head.parameters(), "lr": settings.lr_head},
        ],
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    ids = tokenize(tokenizer, data.train.texts, settings.max_len)
    labels = torch.tensor(data.train.labels)
    batches = _batches(len(ids), settings.batch_size, torch.Generator().manual_seed(settings.seed))
    bar = tqdm(
        range(settings.steps),
        desc=f"fine-tune {task.name}",
        disable=not progress,
        unit="step",
        leave=False,
    )
    start, running = time.perf_counter(), 0.0
    for step in bar:
        idx = next(batches)
        input_ids, mask = collate([ids[i] for i in idx], tokenizer.pad_token_id)
        loss = torch.nn.functional.cross_entropy(head(pooled(model, input_ids, mask)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
    seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.0f s, final loss %.3f", task.name, settings.steps, seconds, running)
    expert_head = Head(
        task.name, task.classes, head.weight.detach().clone(), head.bias.detach().clone()
    )
    _write_expert(model.eval(), expert_head, base, out, settings, seconds)
    return load_expert(out)


def _write_expert(
    model: torch.nn.Module,
    head: Head,
    base: Path,
    out: Path,
    settings: TrainSettings,
    seconds: float,
) -> None:
    tmp = out.with_name(f".{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    copy_tokenizer(base, tmp)
    head.save(
        tmp, train=dataclasses.asdict(settings), train_seconds=round(seconds, 1), base=str(base)
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def build_expert(
    name: str,
    config: BenchConfig,
    root: Path,
    base: Path,
    *,
    base_fingerprint: str | None = None,
    progress: bool = True,
) -> Expert:
    """The expert of task ``name``: reused from ``root`` or fine-tuned now."""
    base_fp = base_fingerprint or folder_fingerprint(base)
    out = expert_dir(root, name, config.train, base_fp)
    if (out / Head.META).exists():
        log.info("%s: reusing expert %s", name, out)
        return load_expert(out)
    log.info("%s: fine-tuning an expert for %d steps", name, config.train.steps)
    return train_expert(load_task(name, root), base, out, config.train, progress=progress)


def build_experts(
    config: BenchConfig,
    root: Path,
    base: Path,
    *,
    progress: bool = True,
) -> dict[str, Expert]:
    """The experts of every task in ``config``: reused from ``root`` or fine-tuned now."""
    base_fp = folder_fingerprint(base)
    return {
        name: build_expert(name, config, root, base, base_fingerprint=base_fp, progress=progress)
        for name in config.tasks
    }
