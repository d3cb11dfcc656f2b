"""Merge configurations: mergekit's YAML schema, and how parameter values resolve per tensor.

A config names a ``merge_method``, an optional ``base_model``, and either ``models`` (each with
``parameters``) or ``slices`` (layer ranges of source models, stacked in order). Parameter
values take three forms, exactly as in mergekit:

* a scalar: ``weight: 0.5``;
* a gradient: ``weight: [0, 0.5, 1]``, interpolated linearly at t = i / (n − 1) for layer i of a
  slice of n layers, t = 1 in a slice of one layer (tensors outside the layers take the first
  value, t = 0);
* a filter list: ``weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]``: the first entry whose
  filter is a substring of the tensor name (or that has no filter, or ``*``) wins; its value may
  itself be a gradient.

Precedence: a slice source's parameters, then the slice's, then the top-level ``parameters``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Union

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    field_validator,
    model_validator,
)

from taskvec.errors import ConfigError

Scalar = Union[float, int, bool, str]  # noqa: UP007  (pydantic needs a runtime union)


class FilterValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[float]


ParameterValue = Union[Scalar, list[float], list[FilterValue]]  # noqa: UP007
Parameters = dict[str, ParameterValue]


def _parameters(v: Any) -> Any:
    """``parameters:`` left empty in YAML is null, which mergekit reads as no parameters; an
    empty list (a gradient or filter value with no points) gives no value at all."""
    if v is None:
        return {}
    for key, value in v.items() if isinstance(v, dict) else ():
        values = value if isinstance(value, list) else []
        if value == [] or any(isinstance(e, dict) and e.get("value") == [] for e in values):
            raise ValueError(
                f"parameter {key!r} is an empty list (give a value, a gradient of values or a "
                "filter list)"
            )
    return v


ParametersField = Annotated[Parameters, BeforeValidator(_parameters)]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: ParametersField = {}
    statistics: str | None = None  # a `taskvec stats` folder, for methods that use statistics
    data: str | None = None  # a data source (taskvec.data), for methods that run the models


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: ParametersField = {}

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: ParametersField = {}
    residual_weight: float | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span as many layers (got {lengths})")
        return self


class MergeConfig(BaseModel):
    """A merge, as written in a mergekit-style YAML file."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: ParametersField = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_input_kind(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        return self


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    if first["type"] == "missing":
        return f"missing required config key {where!r}"
    if first["type"] == "value_error":  # our own validators' message, without pydantic's prefix
        return f"{where}: {first['ctx']['error']}"
    return f"{where}: {first['msg']}"


def parse_config(source: str | os.PathLike[str] | dict[str, Any] | MergeConfig) -> MergeConfig:
    """Read a config from a YAML path, a dict, or pass a :class:`MergeConfig` through."""
    if isinstance(source, MergeConfig):
        return source
    if isinstance(source, dict):
        data: Any = source
        origin = "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a merge config is YAML)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: malformed YAML{at}") from None
        origin = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a merge config must be a YAML mapping")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {_describe(e)}") from None


def resolve_value(value: ParameterValue, tensor: str, t: float) -> Scalar | None:
    """The value of one parameter for ``tensor`` at relative layer position ``t`` in [0, 1].

    ``None`` means a filter list had no entry matching this tensor.
    """
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        for entry in value:
            assert isinstance(entry, FilterValue)
            if entry.filter in (None, "*") or entry.filter in tensor:
                return resolve_value(entry.value, tensor, t)
        return None
    if isinstance(value, list):
        points = [float(v) for v in value]  # type: ignore[arg-type]
        if len(points) == 1:
            return points[0]
        return float(np.interp(t, np.linspace(0.0, 1.0, len(points)), points))
    return value


def lookup(key: str, levels: list[Parameters], tensor: str, t: float) -> tuple[bool, Scalar | None]:
    """Find ``key`` in the first level (most specific first) that gives it a value here."""
    for params in levels:
        if key in params:
            v = resolve_value(params[key], tensor, t)
            if v is not None:
                return True, v
    return False, None
