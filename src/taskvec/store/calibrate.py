"""BitDelta scale distillation of a stored ``sign`` vector (Liu et al., arXiv 2402.10193, §3.2).

A ``sign`` vector stores, per matrix m, τ̂_m = α_m·S_m with S_m = sign(τ_m) and α_m = mean|τ_m|.
Distillation fits the α's alone so that the base with the decoded vector behaves like the
fine-tuned model: it minimises

    L(α) = mean over real tokens ‖f(θ₀ + Σ_m α_m S_m; x) − f(θ_ft; x)‖²

(f: the model's logits, or its last hidden states when it has no head) with Adam on
calibration texts x, the signs and every other tensor fixed. The paper uses AdamW, lr 1e-4,
100–200 steps, C4 at sequence length 128. The result is recorded as a new vector (or in place):
the same blob but for its α parts, the relative errors remeasured against τ = θ_ft − θ₀.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from taskvec.algebra import load_model as load_weights
from taskvec.data import open_data
from taskvec.errors import ConfigError, IncompatibleError
from taskvec.forward import Head, batches, checkpoint_names, load_model, load_tokenizer
from taskvec.io.checkpoint import open_checkpoint
from taskvec.store.equip import check_base
from taskvec.store.records import VectorRecord
from taskvec.store.store import Store


def _outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, params: Any = None):
    args = {"input_ids": ids, "attention_mask": mask}
    out = model(**args) if params is None else torch.func.functional_call(model, params, (), args)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    return (student[keep] - teacher[keep]).pow(2).mean()


def calibrate_signs(
    store: Store,
    name: str,
    finetuned: str | os.PathLike[str],
    data: str,
    *,
    new_name: str | None = None,
    column: str | None = None,
    examples: int = 64,
    batch_size: int = 4,
    max_length: int = 128,
    steps: int = 100,
    lr: float = 1e-4,
    head: Head = "auto",
) -> tuple[VectorRecord, dict[str, float]]:
    """Distil the scales of the stored ``sign`` vector ``name`` towards ``finetuned`` on the
    texts of ``data``; the new record (``new_name``, default: ``name`` replaced) and the mean
    loss over the calibration batches before and after."""
    record = store.get(name)
    store.check_name(new_name or name, replace=new_name in (None, name))
    signed = {t.name for t in record.tensors if "alpha" in t.parts}
    if not signed:
        raise ConfigError(f"{name!r} has no sign-coded matrix (store it with --codec sign)")
    if record.base_path is None or not Path(record.base_path).exists():
        raise ConfigError(f"{name!r}: its base {record.base_path} is not here to calibrate on")
    check_base(record, open_checkpoint(record.base_path))
    ckpt = store.checkpoint(name)
    student, teacher = load_model(record.base_path, head), load_model(finetuned, head)
    mapping = checkpoint_names(student, ckpt.tensors)
    fixed, signs, alphas0 = {}, {}, {}
    with torch.no_grad():
        for param, tensor in mapping.items():
            base = student.get_parameter(param).detach()
            if tensor in signed:
                alphas0[param] = float(ckpt.part(tensor, "alpha")[0])
                signs[param] = torch.sign(ckpt.read(tensor)).reshape(base.shape)
                fixed[param] = base
            else:
                fixed[param] = base + ckpt.read(tensor).reshape(base.shape)
    order = list(alphas0)
    alphas = torch.nn.Parameter(torch.tensor([alphas0[p] for p in order]))

    def params() -> dict[str, torch.Tensor]:
        out = dict(fixed)
        for i, p in enumerate(order):
            out[p] = fixed[p] + alphas[i] * signs[p]
        return out

    texts = [e.text for e in open_data(data, column).examples(examples)]
    tokenizer = load_tokenizer(finetuned)
    data_batches = list(batches(tokenizer, texts, batch_size, max_length))
    with torch.no_grad():
        targets = [_outputs(teacher, ids, mask) for ids, mask in data_batches]

    def mean_loss() -> float:
        with torch.no_grad():
            p = params()
            losses = [
                float(_loss(_outputs(student, ids, mask, p), target, mask))
                for (ids, mask), target in zip(data_batches, targets, strict=True)
            ]
        return sum(losses) / len(losses)

    before = mean_loss()
    optimiser = torch.optim.Adam([alphas], lr=lr)
    for step in range(steps):
        ids, mask = data_batches[step % len(data_batches)]
        optimiser.zero_grad()
        _loss(_outputs(student, ids, mask, params()), targets[step % len(targets)], mask).backward()
        optimiser.step()
    after = mean_loss()
    fitted = {mapping[p]: float(alphas[i]) for i, p in enumerate(order)}
    settings = {"data": data, "examples": len(texts), "steps": steps, "lr": lr}
    rec = _record(store, record, new_name or name, fitted, finetuned, settings, before, after)
    return rec, {"loss_before": before, "loss_after": after}


def _record(
    store: Store,
    record: VectorRecord,
    name: str,
    alphas: dict[str, float],
    finetuned: str | os.PathLike[str],
    settings: dict[str, Any],
    before: float,
    after: float,
) -> VectorRecord:
    """``record`` with its α parts replaced, errors remeasured, as ``name``."""
    ckpt = store.checkpoint(record.name)
    assert record.base_path is not None
    tau = load_weights(finetuned) - load_weights(record.base_path)
    if not all(t.name in tau.specs for t in record.tensors):
        raise IncompatibleError(f"{finetuned}: lacks tensors of {record.name!r}")
    tensors = []

    def recoded() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for t in record.tensors:
            parts = {k: ckpt.part(t.name, k) for k in t.parts}
            error = t.rel_error
            if t.name in alphas:
                parts["alpha"] = torch.tensor([alphas[t.name]], dtype=torch.float32)
                decoded = torch.sign(ckpt.read(t.name)) * parts["alpha"]
                error = _relative(decoded, tau.tensor(t.name))
            tensors.append(dataclasses.replace(t, rel_error=error))
            yield t.name, parts

    with store.writing():
        digest, checksum, size = store.write_blob([t.name for t in record.tensors], recoded())
        out = dataclasses.replace(
            record,
            name=name,
            blob=digest,
            blob_bytes=size,
            blob_checksum=checksum,
            tensors=tensors,
            codec=f"{record.codec}+calibrated",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            provenance={
                **record.provenance,
                "parents": [record.name] if name != record.name else record.provenance["parents"],
                "calibration": {
                    **settings,
                    "teacher": str(Path(finetuned).absolute()),
                    "loss_before": before,
                    "loss_after": after,
                },
            },
        )
        store.catalogue.insert(out, replace=name == record.name)
    return out


def _relative(decoded: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.double().norm())
    err = float((decoded.reshape(exact.shape).double() - exact.double()).norm())
    return err / norm if norm > 0 else err
