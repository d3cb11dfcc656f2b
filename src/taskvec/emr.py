"""EMR-merging: one unified task vector plus a mask and a scale per task
(Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024,
arXiv 2405.17461).

* Elect: γ = sign(Σᵢ τᵢ) (0 counts as −), τ_uni = γ ⊙ max over the i with sign τᵢ = γ of |τᵢ|.
* Masks: Mᵢ = [τᵢ ⊙ γ > 0].
* Rescalers: λᵢ = Σ|τᵢ| / Σ|Mᵢ ⊙ τ_uni| over the whole model.
* Task model i: θᵢ' = θ₀ + λᵢ Mᵢ ⊙ τ_uni.

:func:`emr_merge` streams the task vectors once and writes an EMR folder: ``unified`` tensors
and bit-packed ``masks`` (one ``(T, ⌈n/8⌉)`` uint8 tensor per parameter) in safetensors,
and ``emr.json`` with the task names and scales. :func:`emr_task_vector` gives task i back as
a lazy :class:`~taskvec.algebra.TaskVector`, so ``base + emr_task_vector(folder, "math")``
saves that task's model. ``merge_method: emr`` in a merge config (:func:`plan_emr`,
:func:`run_emr`) and ``taskvec emr`` write the same folder.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskvec.algebra import Spec, TaskVector, _Cache, load_model
from taskvec.config import MergeConfig
from taskvec.engine import Job, default_threads, execute, planned_tensors
from taskvec.errors import CheckpointError, IncompatibleError, TaskvecError
from taskvec.io.checkpoint import Checkpoint, check_not_an_input, open_checkpoint
from taskvec.io.writer import CheckpointWriter, check_output_path

MASK_SUFFIX = ":emr_mask"


def elect_unified(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, masks) for stacked task vectors ``tau`` of shape (T, ...)."""
    gamma = torch.where(tau.sum(0) > 0, 1.0, -1.0).to(tau.dtype)
    agree = tau * gamma > 0
    unified = gamma * (tau.abs() * agree).amax(0)
    return unified, agree


def _pack(masks: torch.Tensor) -> torch.Tensor:
    flat = masks.reshape(masks.shape[0], -1).numpy()
    return torch.from_numpy(np.packbits(flat, axis=1))


def _unpack(packed: torch.Tensor, row: int, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    bits = np.unpackbits(packed[row].numpy())[:n]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def emr_merge(
    vectors: dict[str, TaskVector],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the EMR decomposition of the named task vectors to the folder ``out``."""
    check_vectors(vectors)
    names = list(vectors)
    tvs = list(vectors.values())
    specs = tvs[0].specs
    out_path = Path(out).expanduser().absolute()
    check_output_path(out_path, overwrite)
    check_not_an_input(out_path, [c for v in tvs for c in v._leaves()])
    sums = torch.zeros(2, len(tvs), dtype=torch.float64)  # Σ|τᵢ|, Σ|Mᵢ τ_uni|
    lock = threading.Lock()

    def unified(name: str) -> torch.Tensor:
        tau = torch.stack([v._eval(name, _Cache()) for v in tvs])
        uni, agree = elect_unified(tau)
        with lock:
            sums[0] += tau.abs().reshape(len(tvs), -1).sum(1).double()
            sums[1] += (agree * uni.abs()).reshape(len(tvs), -1).sum(1).double()
        return uni

    def masks(name: str) -> torch.Tensor:
        tau = torch.stack([v._eval(name, _Cache()) for v in tvs])
        return _pack(elect_unified(tau)[1])

    jobs: list[Job] = []
    for name, spec in specs.items():
        numel = math.prod(spec.shape)
        read = 4 * numel * len(tvs)
        jobs.append(Job(name, spec.shape, spec.dtype, read, 3 * read, _bind(unified, name)))
        jobs.append(
            Job(
                name + MASK_SUFFIX,
                (len(tvs), (numel + 7) // 8),
                torch.uint8,
                read,
                3 * read,
                _bind(masks, name),
            )
        )
    writer = CheckpointWriter(
        out_path,
        planned_tensors(jobs),
        metadata={"taskvec.kind": "emr"},
        overwrite=overwrite,
        producer={"operation": "EMR merge", "tasks": names},
    )
    with writer:
        execute(
            jobs,
            writer,
            threads=threads or default_threads(),
            progress=progress,
            description="EMR merge",
        )
        scales = (sums[0] / sums[1].clamp(min=1e-30)).tolist()
        writer.add_json("emr.json", {"kind": "emr", "tasks": names, "scales": scales})
        return writer.commit()


def check_vectors(vectors: dict[str, TaskVector]) -> None:
    """Refuse fewer than two task vectors, or task vectors of other tensors or shapes."""
    if len(vectors) < 2:
        raise IncompatibleError("EMR-merging needs at least two task vectors")
    (first, specs), *others = ((n, v.specs) for n, v in vectors.items())
    for other_name, other in others:
        if set(other) != set(specs):
            raise IncompatibleError(f"task vector {other_name!r} has other tensors than {first!r}")
        for n, s in other.items():
            if s.shape != specs[n].shape:
                raise IncompatibleError(
                    f"shape mismatch for tensor {n!r}: {list(specs[n].shape)} vs {list(s.shape)}"
                )


def task_vectors(
    base: str | os.PathLike[str], models: Mapping[str, str | os.PathLike[str]]
) -> dict[str, TaskVector]:
    """τₜ = θₜ − θ₀ for each named model folder (lazy: headers only)."""
    b = load_model(base)
    return {t: load_model(p) - b for t, p in models.items()}


@dataclass
class EmrPlan:
    """A validated ``merge_method: emr`` config (what ``--dry-run`` reports)."""

    base: str
    experts: dict[str, str]
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"base: {self.base}",
            f"tasks: {', '.join(f'{k}={v}' for k, v in self.experts.items())}",
            "writes: unified task vector, one mask per task, scales in emr.json",
        ]


def plan_emr(cfg: MergeConfig, config_dir: Path | None = None, seed: int | None = None) -> EmrPlan:
    """Check an EMR config and the models' headers (no weights are read); ``seed`` is unused
    (EMR is deterministic)."""
    from taskvec.methods.emr import EMR

    base, experts = EMR.inputs(cfg, config_dir)
    EMR.checked(EMR.given(cfg.parameters), len(experts))
    plan = EmrPlan(base, experts)
    try:
        check_vectors(task_vectors(base, experts))
    except TaskvecError as e:
        plan.problems.append(str(e))
    return plan


def run_emr(
    plan: EmrPlan,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """Write the EMR folder of ``plan`` to ``out`` (on the CPU: ``device`` is not used)."""
    vectors = task_vectors(plan.base, plan.experts)
    return emr_merge(vectors, out, overwrite=overwrite, threads=threads, progress=progress)


def _bind(fn: Any, name: str) -> Any:
    return lambda: fn(name)


class EMRTaskVector(TaskVector):
    """Task ``t`` of an EMR folder: λₜ Mₜ ⊙ τ_uni, lazily."""

    def __init__(self, ckpt: Checkpoint, index: int, scale: float) -> None:
        self.ckpt, self.index, self.scale = ckpt, index, scale

    @cached_property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return {
            n: Spec(i.shape, i.dtype)
            for n, i in self.ckpt.tensors.items()
            if not n.endswith(MASK_SUFFIX)
        }

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        uni = self.ckpt.read(name).float()
        mask = _unpack(self.ckpt.read(name + MASK_SUFFIX), self.index, uni.shape)
        out = self.scale * uni * mask
        return out if cache.rows is None else out[cache.rows[0] : cache.rows[1]]

    def _leaves(self) -> list[Checkpoint]:
        return [self.ckpt]


def emr_task_vector(folder: str | os.PathLike[str], task: str) -> EMRTaskVector:
    """The task vector of ``task`` from an EMR folder written by :func:`emr_merge`."""
    path = Path(folder)
    try:
        info = json.loads((path / "emr.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not an EMR folder (no readable emr.json)") from None
    if task not in info["tasks"]:
        raise CheckpointError(f"{path}: no task {task!r} (it has {', '.join(info['tasks'])})")
    i = info["tasks"].index(task)
    return EMRTaskVector(open_checkpoint(path), i, float(info["scales"][i]))
