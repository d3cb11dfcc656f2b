"""The search space of a merge config: the values marked ``{search: ...}`` in its YAML.

Any numeric value of a config may be replaced by a marker, wherever it stands (a top-level or
per-model parameter, a point of a per-layer gradient, the value of a filter entry)::

    parameters:
      lambda: {search: [0.1, 1.5]}               # uniform on [0.1, 1.5]
      density: {search: [0.05, 0.5], log: true}  # log-uniform
      k: {search: [1, 4], int: true}             # an integer
      normalize: {search: {choices: [true, false]}}
    models:
      - model: a
        parameters: {weight: [{search: [0, 1]}, {search: [0, 1]}]}   # a 2-point gradient

A top-level ``search:`` block puts one per-model parameter on the simplex (αᵢ ≥ 0, Σᵢ αᵢ = 1)
and may penalise its norm: ``search: {simplex: weight, l2: 0.01}`` searches J(α) = objective −
l2·‖α‖₂. The simplex is sampled as αᵢ = eᵢ / Σⱼ eⱼ with eᵢ = −log(1 − uᵢ), uᵢ ∈ [0, 1)
searched, which is uniform on the simplex when the uᵢ are uniform.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from taskvec.errors import ConfigError

MARKER = "search"
SIMPLEX_PREFIX = "simplex:"


@dataclass(frozen=True)
class Dim:
    """One searched value: its name, where it stands in the config, and its domain."""

    name: str
    path: tuple[str | int, ...]
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def corners(self) -> tuple[Any, Any]:
        """The two extreme values (first and last choice)."""
        if self.choices is not None:
            return self.choices[0], self.choices[-1]
        if self.integer:
            return int(self.low), int(self.high)
        return self.low, self.high


@dataclass(frozen=True)
class Simplex:
    """Per-model parameter ``parameter`` of the models at ``paths`` on the simplex."""

    parameter: str
    names: tuple[str, ...]  # one searched coordinate per model
    paths: tuple[tuple[str | int, ...], ...]
    l2: float = 0.0

    def weights(self, u: Mapping[str, float]) -> list[float]:
        """αᵢ = eᵢ / Σ eⱼ, eᵢ = −log(1 − uᵢ) (uniform on the simplex for uniform u)."""
        e = [-math.log1p(-min(u[n], 1 - 1e-12)) for n in self.names]
        total = sum(e)
        return [x / total for x in e] if total > 0 else [1 / len(e)] * len(e)


@dataclass(frozen=True)
class SearchSpace:
    """The template config (markers left in), its searched dimensions and simplex, if any."""

    template: dict[str, Any]
    dims: tuple[Dim, ...]
    simplex: Simplex | None = None

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims] + list(self.simplex.names if self.simplex else ())

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The config with every marker replaced by its value in ``values`` (by dim name) and
        the simplex weights, when searched, written into each model's parameters."""
        config = copy.deepcopy(self.template)
        config.pop(MARKER, None)
        for d in self.dims:
            _put(config, d.path, values[d.name])
        if self.simplex is not None:
            for path, w in zip(self.simplex.paths, self.weights(values), strict=True):
                _put(config, path, w)
        return config

    def weights(self, values: Mapping[str, Any]) -> list[float]:
        return self.simplex.weights(values) if self.simplex is not None else []

    def penalty(self, values: Mapping[str, Any]) -> float:
        """l2·‖α‖₂ of the simplex weights (0 without a simplex or l2)."""
        if self.simplex is None or not self.simplex.l2:
            return 0.0
        return self.simplex.l2 * math.sqrt(sum(w * w for w in self.weights(values)))

    def corners(self) -> list[dict[str, Any]]:
        """Two full assignments, every dim at its low end, then at its high end: the configs
        checked before any trial runs."""
        sides = []
        for side in (0, 1):
            values: dict[str, Any] = {d.name: d.corners()[side] for d in self.dims}
            values.update(dict.fromkeys(self.simplex.names if self.simplex else (), 0.5))
            sides.append(values)
        return sides


def _put(config: Any, path: tuple[str | int, ...], value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def _label(config: Mapping[str, Any], path: tuple[str | int, ...]) -> str:
    """A readable name for a config path: ``lambda``, ``<model>.weight``, ``weight[1]``..."""
    parts: list[str] = []
    node: Any = config
    i = 0
    while i < len(path):
        key = path[i]
        if key == "models" and i + 1 < len(path):
            entry = config["models"][path[i + 1]]
            parts.append(PurePath(str(entry.get("model", path[i + 1]))).name or str(path[i + 1]))
            node, i = entry, i + 2
            continue
        if key in ("parameters", "value"):
            node, i = node[key], i + 1
            continue
        if isinstance(key, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{key}]"]
        else:
            parts.append(str(key))
        node, i = node[key], i + 1
    return ".".join(parts)


def _dim(name: str, path: tuple[str | int, ...], marker: Mapping[str, Any]) -> Dim:
    extra = set(marker) - {MARKER, "log", "int"}
    if extra:
        raise ConfigError(f"search {name}: unknown key(s) {sorted(extra)} (search, log, int)")
    spec = marker[MARKER]
    if isinstance(spec, Mapping):
        choices = spec.get("choices")
        if set(spec) != {"choices"} or not isinstance(choices, list) or len(choices) < 1:
            raise ConfigError(f"search {name}: give a range [low, high] or {{choices: [...]}}")
        return Dim(name, path, choices=tuple(choices))
    if (
        not isinstance(spec, list)
        or len(spec) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec)
    ):
        raise ConfigError(f"search {name}: the range must be [low, high] numbers, got {spec!r}")
    low, high = float(spec[0]), float(spec[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"search {name}: the range [{low}, {high}] is not finite")
    if low >= high:
        what = "empty" if low == high else "reversed"
        raise ConfigError(f"search {name}: the range [{spec[0]}, {spec[1]}] is {what}")
    log, integer = bool(marker.get("log", False)), bool(marker.get("int", False))
    if log and low <= 0:
        raise ConfigError(f"search {name}: a log range needs low > 0, got [{spec[0]}, {spec[1]}]")
    if integer and (low != int(low) or high != int(high)):
        raise ConfigError(f"search {name}: an integer range needs integer ends, got {spec}")
    return Dim(name, path, low, high, log, integer)


def _walk(node: Any, path: tuple[str | int, ...], found: list[tuple[tuple, Mapping]]) -> None:
    if isinstance(node, Mapping):
        if MARKER in node and path and path[0] != MARKER:
            found.append((path, node))
            return
        for key, value in node.items():
            _walk(value, (*path, key), found)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, (*path, i), found)


def search_space(config: Mapping[str, Any]) -> SearchSpace:
    """The search space of a config (a dict as loaded from YAML); one line for a malformed
    marker, an empty or reversed range, or a config with nothing to search."""
    template = copy.deepcopy(dict(config))
    found: list[tuple[tuple, Mapping]] = []
    _walk({k: v for k, v in template.items() if k != MARKER}, (), found)
    dims = [_dim(_label(template, path), path, marker) for path, marker in found]
    names = [d.name for d in dims]
    if len(set(names)) != len(names):  # two models with one folder name: fall back to paths
        dims = [
            Dim(".".join(map(str, d.path)), d.path, d.low, d.high, d.log, d.integer, d.choices)
            for d in dims
        ]
    simplex = _simplex(template)
    if not dims and simplex is None:
        raise ConfigError(
            "the config marks nothing to search: write e.g. `lambda: {search: [0.1, 1.5]}` or a "
            "top-level `search: {simplex: weight}`"
        )
    return SearchSpace(template, tuple(dims), simplex)


def _simplex(template: Mapping[str, Any]) -> Simplex | None:
    block = template.get(MARKER)
    if block is None:
        return None
    if not isinstance(block, Mapping) or set(block) - {"simplex", "l2"} or "simplex" not in block:
        raise ConfigError("the top-level `search:` block takes `simplex: <parameter>` and `l2:`")
    parameter, l2 = block["simplex"], block.get("l2", 0.0)
    if not isinstance(parameter, str):
        raise ConfigError(f"search simplex: name one per-model parameter, got {parameter!r}")
    if not isinstance(l2, int | float) or isinstance(l2, bool) or not l2 >= 0:
        raise ConfigError(f"search l2: must be a number ≥ 0, got {l2!r}")
    models = template.get("models")
    if not isinstance(models, list) or len(models) < 2:
        raise ConfigError("search simplex: needs a `models:` list of at least two models")
    names, paths = [], []
    for i, entry in enumerate(models):
        label = PurePath(str(entry.get("model", i))).name
        names.append(f"{SIMPLEX_PREFIX}{label}" if label else f"{SIMPLEX_PREFIX}{i}")
        paths.append(("models", i, "parameters", parameter))
        if entry.get("parameters") is None:
            entry["parameters"] = {}
        if parameter in entry["parameters"]:
            raise ConfigError(
                f"search simplex: {label}.{parameter} is set in the config; the simplex sets it"
            )
    if len(set(names)) != len(names):
        names = [f"{SIMPLEX_PREFIX}{i}" for i in range(len(models))]
    return Simplex(parameter, tuple(names), tuple(paths), float(l2))
