"""Build a Twin-Merging folder (Lu et al., NeurIPS 2024, arXiv 2406.15479).

* Shared knowledge θ* = task arithmetic θ₀ + λ Σₜ (θₜ − θ₀), or the merge of the experts by
  any per-tensor method (``method`` and its ``parameters``, as in a merge config), or any
  merged model given.
* Exclusive knowledge vₜ = θₜ − θ*: for a 2-D tensor its rank-k truncated SVD Uₖ Sₖ Vₖᵀ stored
  as factors B = Uₖ (m×k) and A = Sₖ Vₖᵀ (k×n), k = ⌈fraction · min(m, n)⌉ (10 % by default);
  1-D tensors whole; a tensor no expert changed (vₜ = 0 for every t) is not stored.
* Router: :class:`~taskvec.twin.router.Router` on θ*'s mean-pooled last hidden state, trained on
  task-labelled inputs (each ``--data TASK=PATH`` labels its inputs with TASK).

The folder is θ* as a ``save_pretrained`` model (config, tokenizer copied) plus
``twin/factors.safetensors`` (``TASK/TENSOR:A``, ``TASK/TENSOR:B``, ``TASK/TENSOR`` for 1-D),
``twin/router.safetensors`` and ``twin.json`` (tasks, fraction, λ, extra bytes); written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from taskvec.algebra import Model, load_model
from taskvec.bench.encoder import pooled
from taskvec.data import TextData, open_data
from taskvec.emr import check_vectors
from taskvec.errors import IncompatibleError
from taskvec.forward import batches, checkpoint_names, load_tokenizer
from taskvec.forward import load_model as load_hf
from taskvec.io.writer import check_output_path
from taskvec.merge import merge_tensors, plan_merge
from taskvec.twin.router import train_router

DEFAULT_FRACTION = 0.1
DEFAULT_SCALE = 0.3
FACTORS = "twin/factors.safetensors"
ROUTER = "twin/router.safetensors"
INFO = "twin.json"


class RouterDataError(IncompatibleError):
    """Router data that does not say which task each input belongs to."""


def rank_for(shape: tuple[int, ...], fraction: float) -> int:
    """k = ⌈fraction · min(m, n)⌉, at least 1."""
    return max(1, math.ceil(fraction * min(shape)))


def low_rank(delta: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-k approximation of the 2-D ``delta`` (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = rank_for(tuple(delta.shape), fraction)
    return u[:, :k].float().contiguous(), (s[:k, None] * vh[:k]).float().contiguous()


def exclusive(delta: torch.Tensor, fraction: float) -> dict[str, torch.Tensor]:
    """Stored form of one tensor's vₜ: ``{":B": B, ":A": A}`` for 2-D, ``{"": v}`` otherwise."""
    if delta.ndim == 2:
        b, a = low_rank(delta, fraction)
        return {":B": b, ":A": a}
    return {"": delta.float().contiguous()}


@dataclass(frozen=True)
class TwinInputs:
    """Checked inputs of a build: models (headers read) and one labelled data source per task."""

    base: str
    experts: dict[str, str]
    data: dict[str, TextData]
    shared: Model | dict[str, Any]  # θ*, or the merge config that makes it


def check_inputs(
    base: str | os.PathLike[str],
    experts: Mapping[str, str | os.PathLike[str]],
    data: Mapping[str, str],
    shared: str | os.PathLike[str] | None,
    scale: float,
    method: tuple[str, Mapping[str, Any]] | None = None,
) -> TwinInputs:
    """Refuse, with one line and before any weight is read: fewer than two experts, experts of
    another architecture, a task without router data or data for no expert, unreadable data,
    both a merged model and a method for θ*, a merge of θ* that would not plan."""
    if len(experts) < 2:
        raise IncompatibleError("Twin-Merging needs at least two experts")
    b = load_model(base)
    models = {t: load_model(p) for t, p in experts.items()}
    check_vectors({t: m - b for t, m in models.items()})
    unknown = sorted(set(data) - set(experts))
    if unknown:
        raise RouterDataError(f"router data for {unknown[0]!r}, which is no expert's task")
    missing = [t for t in experts if t not in data]
    if missing:
        raise RouterDataError(f"no router data for task {missing[0]!r} (give --data TASK=PATH)")
    sources = {t: open_data(p) for t, p in data.items()}
    merged: Model | dict[str, Any]
    if shared is not None and method is not None:
        raise IncompatibleError("θ* is either a merged model (--shared) or a merge (--method)")
    if method is not None:
        merged = {
            "merge_method": method[0],
            "base_model": str(base),
            "models": [{"model": str(p)} for p in experts.values()],
            "parameters": dict(method[1]),
        }
        if problems := plan_merge(merged).problems:
            raise IncompatibleError(f"the merge for θ* ({method[0]}): {problems[0]}")
    elif shared is None:
        merged = b + scale * sum(m - b for m in models.values())
    else:
        merged = load_model(shared)
        check_vectors({"shared": merged - b, **{t: m - b for t, m in models.items()}})
    load_tokenizer(base)
    return TwinInputs(str(base), {t: str(p) for t, p in experts.items()}, sources, merged)


def shared_state(model: torch.nn.Module, theta: Mapping[str, torch.Tensor]) -> None:
    """Load θ* (checkpoint tensor names) into the Hugging Face ``model`` in place."""
    names = checkpoint_names(model, theta)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, cname in names.items():
            params[pname].copy_(theta[cname].to(params[pname].dtype))


@torch.no_grad()
def pooled_features(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_len: int
) -> torch.Tensor:
    """Mean-pooled last hidden states of ``texts`` (N, d): what the router reads."""
    out = []
    for ids, mask in batches(tokenizer, texts, batch_size, max_len):
        out.append(pooled(model, ids, mask))
    return torch.cat(out).float()


def build_twin(
    base: str | os.PathLike[str],
    experts: Mapping[str, str | os.PathLike[str]],
    data: Mapping[str, str],
    out: str | os.PathLike[str],
    *,
    shared: str | os.PathLike[str] | None = None,
    method: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    scale: float = DEFAULT_SCALE,
    fraction: float = DEFAULT_FRACTION,
    examples: int | None = 256,
    batch_size: int = 32,
    max_len: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the twin folder of ``experts`` (task → model folder) over ``base`` to ``out``;
    ``data`` maps each task to its router data (the first ``examples`` inputs are used). θ* is
    ``shared`` (a merged model), else the experts merged by ``method`` with ``parameters``,
    else their task arithmetic at λ = ``scale``."""
    if not 0 < fraction <= 1:
        raise IncompatibleError(f"rank fraction must be in (0, 1], not {fraction}")
    if not math.isfinite(scale):
        raise IncompatibleError(f"task-arithmetic scale must be a finite number, not {scale}")
    out_path = Path(out).expanduser().absolute()
    check_output_path(out_path, overwrite)
    merge = None if method is None else (method, parameters or {})
    inputs = check_inputs(base, experts, data, shared, scale, merge)
    theta_star = inputs.shared
    if isinstance(theta_star, dict):
        theta_star = load_model(base).patched(merge_tensors(theta_star).tensors)
    specs = theta_star.specs
    floats = [n for n, s in specs.items() if s.dtype.is_floating_point]
    theta = {n: theta_star.tensor(n).float() for n in floats}
    experts = {t: load_model(p) for t, p in inputs.experts.items()}
    factors: dict[str, torch.Tensor] = {}
    for n in floats:
        deltas = {t: m.tensor(n).float() - theta[n] for t, m in experts.items()}
        if not any(d.any() for d in deltas.values()):
            continue  # no expert moved it (e.g. frozen embeddings): nothing to route
        for task, delta in deltas.items():
            for suffix, t in exclusive(delta, fraction).items():
                factors[f"{task}/{n}{suffix}"] = t
    model = load_hf(inputs.base, head="base")
    shared_state(model, theta)
    tokenizer = load_tokenizer(inputs.base)
    feats, labels = [], []
    for i, source in enumerate(inputs.data.values()):
        texts = [e.text for e in source.examples(examples)]
        feats.append(pooled_features(model, tokenizer, texts, batch_size, max_len))
        labels.append(torch.full((len(texts),), i, dtype=torch.long))
    router = train_router(torch.cat(feats), torch.cat(labels), len(inputs.experts), seed=seed)
    extra = sum(t.numel() * t.element_size() for t in factors.values())
    info = {
        "kind": "twin",
        "tasks": list(inputs.experts),
        "fraction": fraction,
        "scale": scale if shared is None and method is None else None,
        "shared": _shared_label(shared, method, parameters),
        "hidden": int(feats[0].shape[1]),
        "extra_bytes": extra,
        "seed": seed,
    }
    records: dict[str, dict[str, Any] | bytes] = {
        FACTORS: save(factors),
        ROUTER: save({k: v.contiguous() for k, v in router.state_dict().items()}),
        INFO: info,
    }
    return theta_star.save(out_path, overwrite=overwrite, progress=progress, records=records)


def _shared_label(
    shared: str | os.PathLike[str] | None, method: str | None, parameters: Mapping[str, Any] | None
) -> str:
    """What θ* is, for ``twin.json``."""
    if shared is not None:
        return str(shared)
    if method is not None:
        return f"{method} {dict(parameters or {})}"
    return "task arithmetic"
