"""What an analysis reads: the base, the task vectors and the merged models, checked from headers.

Every problem (a missing path, a model of another architecture, a shape mismatch, no tensor in
common) is one :class:`~taskvec.errors.TaskvecError` raised here, before any tensor is read.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taskvec.algebra import Model, TaskVector, load, load_model
from taskvec.errors import IncompatibleError
from taskvec.io.checkpoint import Checkpoint
from taskvec.layout import LayerLayout

log = logging.getLogger("taskvec")

PathLike = str | os.PathLike[str]


def _architecture(ckpt: Checkpoint) -> str | None:
    cfg = ckpt.config
    if not cfg:
        return None
    return ",".join(cfg.get("architectures") or []) or cfg.get("model_type")


def _labels(paths: list[Path], given: list[str] | None) -> list[str]:
    """``given``, or the folder/file names (made unique with a suffix)."""
    if given is not None:
        if len(given) != len(paths) or len(set(given)) != len(given):
            raise IncompatibleError(f"give {len(paths)} distinct names, one per model")
        return list(given)
    labels: list[str] = []
    for p in paths:
        stem = p.stem if p.is_file() else p.name
        label, i = stem, 2
        while label in labels:
            label, i = f"{stem}-{i}", i + 1
        labels.append(label)
    return labels


@dataclass(frozen=True)
class Inputs:
    """The task vectors (τ_t = θ_t − θ_base, or saved ones), the merged models' τ, the tensors
    analysed (those every vector has) and where the layers are."""

    base: Model
    tasks: dict[str, TaskVector]
    merged: dict[str, TaskVector]
    names: list[str]
    layout: LayerLayout
    left_out: list[str]

    @property
    def vectors(self) -> list[TaskVector]:
        return [*self.tasks.values(), *self.merged.values()]

    @property
    def parameters(self) -> int:
        tv = self.vectors[0]
        return sum(math.prod(tv.specs[n].shape) for n in self.names)

    def read_bytes(self) -> int:
        """Bytes one pass reads: every leaf checkpoint's share of the analysed tensors."""
        leaves = {id(c): c for v in self.vectors for c in v._leaves()}.values()
        return sum(c.tensors[n].nbytes for c in leaves for n in self.names if n in c)


def _vector(path: Path, base: Model, base_arch: str | None) -> TaskVector:
    """``path`` as a task vector: a saved one as is, a model minus the base."""
    obj = load(path)
    if isinstance(obj, TaskVector):
        for name, spec in obj.specs.items():
            if name in base.specs and base.specs[name].shape != spec.shape:
                raise IncompatibleError(
                    f"shape mismatch for tensor {name!r}: {list(spec.shape)} in {path} vs "
                    f"{list(base.specs[name].shape)} in the base"
                )
        return obj
    arch = _architecture(obj.primary)
    if base_arch and arch and arch != base_arch:
        raise IncompatibleError(f"{path}: a {arch} model, but the base is {base_arch}")
    return obj - base


def open_inputs(
    base: PathLike,
    models: Sequence[PathLike],
    merged: Sequence[PathLike] = (),
    names: list[str] | None = None,
) -> Inputs:
    """Open and check everything from headers (see the module docstring)."""
    if not models:
        raise IncompatibleError("give at least one fine-tuned model or task vector")
    base_model = load_model(base)
    base_arch = _architecture(base_model.primary)
    paths = [Path(p).expanduser() for p in models]
    merged_paths = [Path(p).expanduser() for p in merged]
    tasks = {
        label: _vector(p, base_model, base_arch)
        for label, p in zip(_labels(paths, names), paths, strict=True)
    }
    merged_labels = [f"merged:{label}" for label in _labels(merged_paths, None)]
    merged_vectors = {
        label: _vector(p, base_model, base_arch)
        for label, p in zip(merged_labels, merged_paths, strict=True)
    }
    vectors = [*tasks.values(), *merged_vectors.values()]
    first = vectors[0].specs
    names_all = [n for n in first if all(n in v.specs for v in vectors)]
    for v in vectors[1:]:
        for n in names_all:
            if v.specs[n].shape != first[n].shape:
                raise IncompatibleError(
                    f"shape mismatch for tensor {n!r}: {list(first[n].shape)} vs "
                    f"{list(v.specs[n].shape)} ({v!r})"
                )
    if not names_all:
        raise IncompatibleError("the task vectors share no tensor; are they of one architecture?")
    union = {n for v in vectors for n in v.specs}
    left_out = sorted(union - set(names_all))
    if left_out:
        log.warning(
            "analysing the %d tensors every vector has; %d left out, e.g. %s",
            len(names_all),
            len(left_out),
            left_out[0],
        )
    return Inputs(
        base_model,
        tasks,
        merged_vectors,
        names_all,
        LayerLayout.infer(names_all),
        left_out,
    )
