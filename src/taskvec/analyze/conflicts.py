"""Where a merge config's inputs conflict most (``taskvec analyze --merge cfg.yaml``).

The config's ``base_model`` and input models become the analysis's base and task vectors (added
to those given). For its inputs S, with weights w_i (a model's scalar ``weight`` parameter, else
1), each layer l gets, from the per-layer sums of the streamed pass:

* the mean pairwise sign conflict among S (the entries both change with opposite signs: what
  TIES's sign election resolves, Yadav et al. 2023);
* the mean pairwise cosine;
* the norm retained by the weighted sum, ρ_l = ‖Σ_i w_i τ_i,l‖ / Σ_i |w_i| ‖τ_i,l‖, from the
  layer's Gram matrix: 1 when the inputs point the same way, lower as they cancel.

Layers are ranked by sign conflict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from taskvec.analyze.inputs import PathLike
from taskvec.config import parse_config
from taskvec.errors import ConfigError

TOP_LAYERS = 5


def merge_inputs(config: PathLike) -> tuple[str | None, dict[str, float]]:
    """The config's base model and its input models with their weights, each path as the
    merge command finds it: as given, else relative to the config file's folder."""
    cfg = parse_config(config)
    folder = Path(config).parent

    def where(ref: str) -> str:
        path = Path(ref).expanduser()
        if not path.exists() and not path.is_absolute() and (folder / path).exists():
            return str(folder / path)
        return ref

    sources = (
        [(m.model, m.parameters) for m in cfg.models]
        if cfg.models is not None
        else [(s.model, s.parameters) for sl in cfg.slices or [] for s in sl.sources]
    )
    weights: dict[str, float] = {}
    for model, params in sources:
        w = params.get("weight", 1.0)
        weights.setdefault(where(model), float(w) if isinstance(w, int | float) else 1.0)
    return (None if cfg.base_model is None else where(cfg.base_model)), weights


def same_path(a: PathLike, b: PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def layer_conflicts(
    result: dict[str, Any], members: list[int], weights: list[float]
) -> dict[str, Any]:
    """The ``merge`` section: the measures above per layer, and the worst layers."""
    if len(members) < 2:
        raise ConfigError("--merge: the config must have at least two input models")
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
    per_layer = result["per_layer"]
    rows = []
    for layer in range(result["layers"]):
        conflicts = [per_layer["sign_conflict"][layer][a][b] for a, b in pairs]
        conflicts = [c for c in conflicts if c is not None]
        cosines = [per_layer["cosine"][layer][a][b] for a, b in pairs]
        g = torch.tensor(per_layer["gram"][layer], dtype=torch.float64)[members][:, members]
        w = torch.tensor(weights, dtype=torch.float64)
        total = float(w.abs() @ g.diagonal().clamp(min=0).sqrt())
        summed = math.sqrt(max(float(w @ g @ w), 0.0))
        rows.append(
            {
                "layer": layer,
                "sign_conflict": sum(conflicts) / len(conflicts) if conflicts else None,
                "cosine": sum(cosines) / len(cosines),
                "norm_retained": summed / total if total > 0 else None,
            }
        )
    ranked = sorted(
        (r for r in rows if r["sign_conflict"] is not None),
        key=lambda r: -r["sign_conflict"],
    )
    return {
        "inputs": [result["tasks"][m] for m in members],
        "weights": weights,
        "per_layer": rows,
        "worst_layers": [r["layer"] for r in ranked[:TOP_LAYERS]],
    }
