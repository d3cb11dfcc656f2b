"""The ``config.json`` of an output: its dtype, its layers when a merge restacks them, and
what differs from the input's (for ``--dry-run``).

A layer-stacking merge (``slices``) changes the layer count, and every per-layer list of the
config with it: output layer *i* takes the entry of the source layer it was built from, read
in that source model's own config (``layer_types``, ``no_rope_layers``, per-layer head
counts...). A per-layer list is any list, other than the token ids and ``architectures``, as
long as the layer count beside it: at the top and in nested configs (``text_config``). A
(nested) config counts as layered when one of :data:`LAYER_COUNT_KEYS` equals the number of
numbered layers of the reference model's tensors.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import torch

from taskvec.errors import ConfigError
from taskvec.io.dtypes import dtype_name

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NOT_PER_LAYER = ("architectures",)

Config = dict[str, Any]
# Output layer i comes from layer ``origins[i][1]`` of the model whose config is
# ``origins[i][0]`` (``None`` when that model has no config.json).
Origins = Sequence[tuple[Config | None, int]]


def with_dtype(config: Config, dtype: torch.dtype | None) -> Config:
    """``config`` recording ``dtype`` as the weights' dtype (unchanged for ``None``)."""
    if dtype is None:
        return config
    out = {**config, "torch_dtype": dtype_name(dtype)}
    if "dtype" in out:
        out["dtype"] = dtype_name(dtype)
    return out


def _layer_count(node: Config) -> int | None:
    for key in LAYER_COUNT_KEYS:
        value = node.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _per_layer(key: str, value: Any, layers: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == layers
        and key not in _NOT_PER_LAYER
        and not key.endswith(("token_id", "token_ids"))
    )


def _at(config: Config | None, path: tuple[str, ...]) -> Config | None:
    node: Any = config
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def restack_layers(reference: Config, origins: Origins, layers: int) -> Config:
    """``reference`` with ``len(origins)`` layers instead of ``layers`` (see the module
    docstring). Raises :class:`ConfigError` for a per-layer entry no config gives."""
    out = copy.deepcopy(reference)
    _restack(out, (), origins, layers)
    return out


def _restack(node: Config, path: tuple[str, ...], origins: Origins, layers: int) -> None:
    if _layer_count(node) == layers:
        for key in LAYER_COUNT_KEYS:
            if node.get(key) == layers:
                node[key] = len(origins)
        for key, value in node.items():
            if _per_layer(key, value, layers):
                node[key] = [_entry(value, path, key, cfg, layer) for cfg, layer in origins]
    for key, value in node.items():
        if isinstance(value, dict):
            _restack(value, (*path, key), origins, layers)


def _entry(
    reference: list[Any], path: tuple[str, ...], key: str, cfg: Config | None, layer: int
) -> Any:
    """Source layer ``layer``'s entry of the list ``key``: from its model's config, or from the
    reference's list when that config lacks it."""
    source = _at(cfg, path) or {}
    theirs = source.get(key)
    if _per_layer(key, theirs, _layer_count(source) or -1) and layer < len(theirs):
        return copy.deepcopy(theirs[layer])
    if layer < len(reference):
        return copy.deepcopy(reference[layer])
    where = ".".join((*path, key))
    raise ConfigError(
        f"config.json: cannot rebuild {where!r} for source layer {layer}: its model's config "
        "has no such per-layer list"
    )


def config_changes(before: Config, after: Config, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key whose value differs (nested configs key by key)."""
    lines = []
    for key in dict.fromkeys([*before, *after]):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_changes(old, new, f"{prefix}{key}.")
        elif key not in before:
            lines.append(f"{prefix}{key}: (absent) -> {_show(new)}")
        elif key not in after:
            lines.append(f"{prefix}{key}: {_show(old)} -> (absent)")
        elif old != new:
            lines.append(f"{prefix}{key}: {_show(old)} -> {_show(new)}")
    return lines


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
