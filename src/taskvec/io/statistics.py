"""Statistics artefacts as merge inputs: one model's Gram matrices or diagonal Fisher.

A statistics folder (``taskvec stats``) is a checkpoint whose safetensors ``__metadata__`` says
``taskvec.kind: statistics``, the kind (``taskvec.statistics: gram`` or ``fisher``) and the
content fingerprint of the model it was computed on (``taskvec.model_fingerprint``, see
:func:`taskvec.io.fingerprint.content_fingerprint`). A Gram folder maps every Linear weight to
the key of its input's Gram matrix XᵀX/N, ``[in, in]`` (``taskvec.gram_of``, a JSON object;
inputs shared by q/k/v or gate/up share one key); a Fisher folder holds each parameter's
diagonal Fisher under the parameter's own name, in the parameter's shape.

:func:`open_statistics` checks all of that against the model from headers and the model's
(cached) content fingerprint, so statistics of another model or base, of the wrong kind, or
missing or misshapen for a tensor, are one line before any merge work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from taskvec.errors import IncompatibleError
from taskvec.io.checkpoint import Checkpoint, open_checkpoint
from taskvec.io.fingerprint import content_fingerprint

KIND = "statistics"  # taskvec.kind of a statistics folder


def statistics_metadata(
    kind: str, examples: int, model_fingerprint: str, gram_of: dict[str, str] | None = None
) -> dict[str, str]:
    """The ``__metadata__`` of a statistics folder (what :func:`open_statistics` reads)."""
    meta = {
        "taskvec.kind": KIND,
        "taskvec.statistics": kind,
        "taskvec.examples": str(examples),
        "taskvec.model_fingerprint": model_fingerprint,
    }
    if gram_of is not None:
        meta["taskvec.gram_of"] = json.dumps(gram_of, sort_keys=True)
    return meta


@dataclass(frozen=True)
class Statistics:
    """One model's statistics: the checkpoint that holds them and, for each model tensor
    that has one, the key of its statistic there."""

    ckpt: Checkpoint
    keys: dict[str, str]


def open_statistics(path: Path, model: Checkpoint, kind: str, where: str) -> Statistics:
    """The ``kind`` statistics in ``path``, checked against ``model`` (``where`` names the
    model in errors, each one line)."""
    if not path.exists():
        raise IncompatibleError(f"{where}: statistics {str(path)!r}: no such file or folder")
    ckpt = open_checkpoint(path)
    meta = ckpt.metadata
    if meta.get("taskvec.kind") != KIND:
        raise IncompatibleError(
            f"{where}: {str(path)!r} is not a statistics folder (write one with taskvec stats)"
        )
    held = meta.get("taskvec.statistics", "unknown")
    if held != kind:
        raise IncompatibleError(
            f"{where}: {str(path)!r} holds {held} statistics, not {kind} (taskvec stats --kind "
            f"{kind})"
        )
    if model.derived:
        raise IncompatibleError(
            f"{where}: statistics need a model, not a task vector (apply it with taskvec apply "
            "and compute the statistics on that model)"
        )
    if meta.get("taskvec.model_fingerprint") != content_fingerprint(model):
        raise IncompatibleError(
            f"{where}: {str(path)!r} was computed on another model (its "
            "taskvec.model_fingerprint is not this model's content fingerprint)"
        )
    keys = _gram_keys(ckpt, path, where) if kind == "gram" else {n: n for n in ckpt.tensors}
    for name, key in keys.items():
        problem = _misfit(ckpt, model, kind, name, key)
        if problem is not None:
            raise IncompatibleError(f"{where}: {str(path)!r}: {problem}")
    return Statistics(ckpt, keys)


def _gram_keys(ckpt: Checkpoint, path: Path, where: str) -> dict[str, str]:
    """``taskvec.gram_of``: Linear weight name -> key of its input's Gram matrix."""
    try:
        gram_of = json.loads(ckpt.metadata.get("taskvec.gram_of", ""))
    except ValueError:
        gram_of = None
    if not isinstance(gram_of, dict) or not all(isinstance(k, str) for k in gram_of.values()):
        raise IncompatibleError(
            f"{where}: {str(path)!r}: taskvec.gram_of is not a JSON object of tensor names"
        )
    return gram_of


def _misfit(ckpt: Checkpoint, model: Checkpoint, kind: str, name: str, key: str) -> str | None:
    """Why the statistic ``key`` does not fit the model's tensor ``name``, if it does not."""
    if name not in model.tensors:
        return f"the model has no tensor {name!r}"
    if key not in ckpt.tensors:
        return f"the {kind} statistic {key!r} of tensor {name!r} is missing"
    shape = model.tensors[name].shape
    if kind == "gram":
        if len(shape) != 2:
            return f"tensor {name!r} of shape {list(shape)} is not a Linear weight"
        shape = (shape[1], shape[1])
    got = ckpt.tensors[key].shape
    if tuple(got) != tuple(shape):
        return f"the {kind} statistic of tensor {name!r} has shape {list(got)}, not {list(shape)}"
    return None
