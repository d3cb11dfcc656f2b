"""A PEFT LoRA adapter folder read as a task vector (Hu et al., "LoRA", arXiv 2106.09685).

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) holds, per
target module m, ``lora_A`` (r × in) and ``lora_B`` (out × r); merged into its base (what
``PeftModel.merge_and_unload`` does) it adds

    τ[m.weight] = s · B A,   s = α / r   (α / √r with ``use_rslora``),

with r and α from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module (the
first key K with ``(.*\\.)?K$`` matching its name, as PEFT does), else ``r`` / ``lora_alpha``.
Embeddings store ``lora_embedding_A`` (r × vocab) and ``lora_embedding_B`` (dim × r):
τ = s · (B A)ᵀ. ``fan_in_fan_out`` layers (GPT-2's Conv1D) take τ = s · (B A)ᵀ too; a
``lora_B.bias`` (``lora_bias``) adds s · bias. ``modules_to_save`` tensors (and the
``base_layer`` weights PEFT saves with embedding adapters) replace the base's: with the base
given, they become τ = saved − base; without it they are left out, with a warning. DoRA and
other PEFT types are refused.

The vector is lazy: each τ is computed from A and B when its tensor is evaluated (a block of
rows: s · B[rows] A).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taskvec.algebra import (
    BaseRecord,
    Model,
    Spec,
    TaskVector,
    _Cache,
    _record_of,
    _unique,
)
from taskvec.errors import CheckpointError, IncompatibleError
from taskvec.io.checkpoint import Checkpoint, open_checkpoint

log = logging.getLogger("taskvec")

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter folder."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class _Lora:
    """How one base tensor is changed: its LoRA factors' keys (or a replacement) and scale."""

    a: str | None
    b: str | None
    scale: float
    transpose: bool  # embeddings and fan_in_fan_out: τ = s · (B A)ᵀ
    bias: str | None = None  # lora_B.bias: τ = s · bias
    replace: str | None = None  # a saved full tensor: τ = saved − base


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder}: not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{folder}: DoRA adapters are not supported (use_dora: true)")
    return cfg


def _plan(folder: Path, cfg: dict[str, Any], ckpt: Checkpoint) -> dict[str, _Lora]:
    """Base tensor name -> how the adapter changes it."""
    keys = set(ckpt.tensors)
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out: dict[str, _Lora] = {}
    for key in sorted(keys):
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{folder}: unexpected adapter tensor {key!r}")
        name = key[len(PREFIX) :]
        for a_suffix, b_suffix, embedding in (
            (".lora_A.weight", ".lora_B.weight", False),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if not name.endswith(a_suffix):
                continue
            module = name[: -len(a_suffix)]
            b_key = f"{PREFIX}{module}{b_suffix}"
            if b_key not in keys:
                raise CheckpointError(f"{folder}: {key!r} has no {b_suffix.lstrip('.')}")
            r = pattern_value(ranks, module, r0)
            if ckpt.tensors[key].shape[0] != r:
                raise CheckpointError(
                    f"{folder}: {module} has rank {ckpt.tensors[key].shape[0]}, the config {r}"
                )
            alpha = pattern_value(alphas, module, alpha0)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            transpose = embedding or bool(cfg.get("fan_in_fan_out"))
            out[f"{module}.weight"] = _Lora(key, b_key, scale, transpose)
            bias = f"{PREFIX}{module}.lora_B.bias"
            if bias in keys:
                out[f"{module}.bias"] = _Lora(None, None, scale, False, bias=bias)
    factors = {x for lo in out.values() for x in (lo.a, lo.b, lo.bias)}
    for key in sorted(keys - factors):
        name = key[len(PREFIX) :].replace(".base_layer.", ".")
        if ".lora_" in name:
            raise CheckpointError(f"{folder}: unsupported adapter tensor {key!r}")
        out.setdefault(name, _Lora(None, None, 1.0, False, replace=key))
    return out


class LoraVector(TaskVector):
    """The task vector of a PEFT LoRA adapter folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], base: Model | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.config = _read_config(self.folder)
        weights = next((self.folder / w for w in _WEIGHTS if (self.folder / w).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{self.folder}: no adapter_model.safetensors")
        self.ckpt = open_checkpoint(weights)
        self.base = base
        plan = _plan(self.folder, self.config, self.ckpt)
        replaced = [n for n, lo in plan.items() if lo.replace is not None]
        if replaced and base is None:
            log.warning(
                "%s: %d saved module tensor(s) (e.g. %s) replace the base's; without the base "
                "they are left out of the task vector",
                self.folder,
                len(replaced),
                replaced[0],
            )
            plan = {n: lo for n, lo in plan.items() if lo.replace is None}
        self._plan = plan
        self._specs = {n: self._spec(n, lo) for n, lo in plan.items()}
        if base is not None:
            have = base.specs
            for name, spec in self._specs.items():
                if name not in have or have[name].shape != spec.shape:
                    got = list(have[name].shape) if name in have else "missing"
                    raise IncompatibleError(
                        f"{self.folder}: adapts {name} {list(spec.shape)}, the base has {got}"
                    )
            self._specs = {n: Spec(s.shape, have[n].dtype) for n, s in self._specs.items()}

    def _spec(self, name: str, lo: _Lora) -> Spec:
        info = self.ckpt.tensors
        if lo.replace is not None:
            return Spec(info[lo.replace].shape, info[lo.replace].dtype)
        if lo.bias is not None:
            return Spec(info[lo.bias].shape, info[lo.bias].dtype)
        assert lo.a is not None and lo.b is not None
        shape = (info[lo.b].shape[0], info[lo.a].shape[1])
        return Spec(shape[::-1] if lo.transpose else shape, info[lo.a].dtype)

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self._specs

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        lo = self._plan[name]
        rows = cache.rows
        if lo.replace is not None:
            assert self.base is not None
            saved = self.ckpt.read(lo.replace, rows).float()
            return saved - self.base._eval(name, cache)
        if lo.bias is not None:
            return self.ckpt.read(lo.bias, rows).float() * lo.scale
        assert lo.a is not None and lo.b is not None
        a, b = self.ckpt.read(lo.a).float(), self.ckpt.read(lo.b).float()
        if lo.transpose:  # τ = s·(B A)ᵀ = s·Aᵀ Bᵀ: rows of τ are columns of A
            a_t = a.t() if rows is None else a.t()[rows[0] : rows[1]]
            return (a_t @ b.t()) * lo.scale
        return ((b if rows is None else b[rows[0] : rows[1]]) @ a) * lo.scale

    def _leaves(self) -> list[Checkpoint]:
        return _unique([self.ckpt, *(self.base._leaves() if self.base is not None else [])])

    def _base_record(self) -> BaseRecord | None:
        return None if self.base is None else _record_of(self.base)

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.folder)!r})"


def load_adapter(folder: str | os.PathLike[str], base: Model | None = None) -> LoraVector:
    """The task vector of the PEFT LoRA adapter ``folder`` (on ``base``, when given)."""
    return LoraVector(folder, base)
