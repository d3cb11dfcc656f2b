"""Extract a PEFT LoRA adapter from a task vector (the semantics of ``mergekit-extract-lora``).

Every matrix ``m.weight`` of τ is factored by its SVD, τ = U S Vᵀ, truncated at rank
r_m = min(r, #{σ > ε}) (``--sv-epsilon`` ε, default 0), with the singular values split
between the factors: B = U_r √S_r (out × r_m), A = √S_r V_rᵀ (r_m × in), so B A is the best
rank-r_m approximation of τ (Eckart–Young). ``lora_alpha`` = r_m per module (scale 1); ranks
below r go into ``rank_pattern`` / ``alpha_pattern``. A module whose τ has no singular value
above ε is left out.

Embeddings (a module named ``*embed*``) are kept at full rank in ``modules_to_save`` as the
fine-tuned weight base + τ, unless ``embed_lora`` decomposes τᵀ into ``lora_embedding_A``
(r × vocab) and ``lora_embedding_B`` (dim × r). A decomposed layer's bias goes, as its
delta, into ``lora_B.bias`` (``lora_bias``). Other tensors (norms, 1-D) go whole into
``modules_to_save`` as base + τ too (mergekit saves the fine-tuned weight, not the delta),
unless ``skip_undecomposable``. Anything saved whole needs the base: the one the task
vector records (content fingerprint checked) or ``base``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from taskvec.algebra import Model, TaskVector, base_mismatch, load_model
from taskvec.errors import ConfigError, IncompatibleError
from taskvec.io.checkpoint import check_not_an_input
from taskvec.io.durable import fsync_path
from taskvec.io.writer import check_output_path
from taskvec.peft_lora import ADAPTER_CONFIG, PREFIX

log = logging.getLogger("taskvec")


def _factors(tau: torch.Tensor, rank: int, sv_epsilon: float) -> tuple[torch.Tensor, ...] | None:
    """(B, A) with B A the truncated SVD of ``tau``; None when no σ exceeds ``sv_epsilon``."""
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    r = min(rank, int((s > sv_epsilon).sum()))
    if r == 0:
        return None
    root = s[:r].sqrt()
    return (u[:, :r] * root).float().contiguous(), (root[:, None] * vh[:r]).float().contiguous()


def _is_embedding(module: str) -> bool:
    return "embed" in module.rsplit(".", 1)[-1]


def _base_of(tau: TaskVector, base: str | os.PathLike[str] | None) -> Model:
    if base is not None:
        model = load_model(base)
        if (problem := base_mismatch(model, tau)) is not None:
            raise IncompatibleError(problem)
        return model
    record = tau._base_record()
    if record is None or not Path(record.path).exists():
        raise ConfigError(
            "the adapter saves whole tensors (embeddings, norms), which needs the base model: "
            "give --base (or --skip-undecomposable with --embed-lora)"
        )
    return _base_of(tau, record.path)


def extract_lora(
    tau: TaskVector,
    out: str | os.PathLike[str],
    rank: int,
    *,
    sv_epsilon: float = 0.0,
    embed_lora: bool = False,
    skip_undecomposable: bool = False,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the adapter of ``tau`` at rank ``rank`` to the folder ``out``; its config."""
    if rank < 1:
        raise ConfigError(f"--rank must be at least 1, not {rank}")
    out_path = Path(out).expanduser().absolute()
    check_not_an_input(out_path, tau._leaves())
    check_output_path(out_path, overwrite)
    matrices = [
        name
        for name, spec in tau.specs.items()
        if name.endswith(".weight")
        and len(spec.shape) == 2
        and (embed_lora or not _is_embedding(name.removesuffix(".weight")))
    ]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in matrices:
        module = name.removesuffix(".weight")
        embedding = _is_embedding(module)
        t = tau.tensor(name)
        pair = _factors(t.t() if embedding else t, rank, sv_epsilon)
        if pair is None:
            continue
        b, a = pair
        ranks[module] = a.shape[0]
        keys = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        suffix = "" if embedding else ".weight"
        tensors[f"{PREFIX}{module}.{keys[0]}{suffix}"] = a
        tensors[f"{PREFIX}{module}.{keys[1]}{suffix}"] = b
    biases = [f"{m}.bias" for m in ranks if f"{m}.bias" in tau.specs and not _is_embedding(m)]
    for name in biases:  # a decomposed layer's bias: its delta, in lora_B.bias (scale 1)
        tensors[f"{PREFIX}{name.removesuffix('.bias')}.lora_B.bias"] = tau.tensor(name)
    done = set(matrices) | set(biases)
    whole = [] if skip_undecomposable else [n for n in tau.specs if n not in done]
    model = _base_of(tau, base) if whole else None
    for name in whole:
        assert model is not None
        tensors[f"{PREFIX}{name}"] = (
            (model.tensor(name) + tau.tensor(name)).to(tau.specs[name].dtype).contiguous()
        )
    top = max(ranks.values(), default=rank)
    pattern = {m: r for m, r in ranks.items() if r != top}
    config = {
        "peft_type": "LORA",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted({n.rpartition(".")[0] for n in whole}) or None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": bool(biases),
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None if model is None else str(model.primary.path),
        "task_type": _task_type(model),
    }
    _write_folder(out_path, tensors, config, overwrite)
    return config


def _task_type(model: Model | None) -> str | None:
    archs = ((model.primary.config or {}) if model is not None else {}).get("architectures") or []
    return "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in archs) else None


def _write_folder(
    out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], overwrite: bool
) -> None:
    """Build the adapter in a hidden sibling folder, then rename it into place."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.rename(tmp, out)
        fsync_path(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
