"""Declared valid values of merge-method parameters, checked before any tensor is read.

A method declares every parameter next to its default::

    per_model={"weight": Param(REQUIRED), "density": Param(1.0, "(0, 1]")},
    globals={"k": Param(2, "[1, N]", integer=True), "normalize": True,
             "trim_scope": Param("tensor", choices=("tensor", "model"))},

* a number's range is an interval written as in mathematics, ``(`` / ``)`` for an open end;
  a bound may be ``inf`` / ``-inf``, or ``N``, the number of models the method merges (the
  inputs besides the base), for a check that depends on the model count. NaN and infinities
  are never valid, whatever the range;
* a mode parameter (a string default) takes one of its ``choices``;
* a switch (a bool default) takes true or false, or one of its ``choices`` (mergekit's
  ``rescale: true`` or ``rescale: expectation``); a plain bool default needs no :class:`Param`;
* a text parameter (``text=True``: a path, a method name) takes any string;
* a default of ``None`` leaves the parameter unset: the method decides (whole-model pipeline
  methods only, see :mod:`taskvec.methods.pipeline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from taskvec.errors import ConfigError

REQUIRED: Any = object()
MODELS = "N"  # a bound equal to the number of models merged


@dataclass(frozen=True)
class Interval:
    """A range of numbers, parsed from ``"(0, 1]"``; a bound ``N`` is the model count."""

    low: float | str
    high: float | str
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        text = text.strip()
        parts = text[1:-1].split(",")
        if len(text) < 2 or text[0] not in "([" or text[-1] not in ")]" or len(parts) != 2:
            raise ValueError(f"malformed range {text!r} (write e.g. '(0, 1]' or '[1, N]')")
        low, high = (p.strip() for p in parts)
        return cls(_bound(low), _bound(high), text[0] == "(", text[-1] == ")")

    @property
    def counts_models(self) -> bool:
        return MODELS in (self.low, self.high)

    def __contains__(self, item: tuple[float, int]) -> bool:
        """Whether ``(x, n_models)`` is in the interval (never for NaN or an infinity)."""
        x, n = item
        low, high = (float(n) if b == MODELS else float(b) for b in (self.low, self.high))
        above = low < x if self.low_open else low <= x
        below = x < high if self.high_open else x <= high
        return math.isfinite(x) and above and below


@dataclass(frozen=True)
class Param:
    """A parameter's default and its valid values (see the module docstring)."""

    default: Any
    range: str = "(-inf, inf)"
    integer: bool = False
    choices: tuple[str, ...] = ()
    text: bool = False
    interval: Interval = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", Interval.parse(self.range))
        unset = self.default is REQUIRED or self.default is None
        if not unset and not self.interval.counts_models:
            try:
                self.check("default", self.default, 1)
            except ConfigError as e:
                raise ValueError(f"a default must obey its own range: {e}") from None

    @property
    def kind(self) -> str:
        """``"switch"``, ``"mode"``, ``"text"`` or ``"number"`` (a required or unset
        parameter is a number unless ``text``)."""
        if self.text:
            return "text"
        if isinstance(self.default, bool):
            return "switch"
        return "mode" if isinstance(self.default, str) else "number"

    def check(self, key: str, value: Any, n_models: int) -> Any:
        """``value`` as the method receives it, or a :class:`ConfigError` saying
        ``key = value is ...`` (the caller names where the value came from)."""
        shown = repr(value) if isinstance(value, str) else str(value).lower()
        if self.kind == "switch":
            if isinstance(value, bool) or value in self.choices:
                return value
            raise ConfigError(f"{key} = {shown} is not {self.describe()}")
        if self.kind == "mode":
            if value in self.choices:
                return value
            raise ConfigError(f"{key} = {shown} is not {self.describe()}")
        if self.kind == "text":
            if isinstance(value, str):
                return value
            raise ConfigError(f"{key} = {shown} is not {self.describe()}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {shown} is not a number")
        x = float(value)
        if (x, n_models) not in self.interval:
            models = f" (N = {n_models} model(s) merged)" if self.interval.counts_models else ""
            raise ConfigError(f"{key} = {shown} is out of range {self.range}{models}")
        if self.integer and x != int(x):
            raise ConfigError(f"{key} = {shown} is not a whole number (range {self.range})")
        return x

    def describe(self) -> str:
        """The valid values, as the method reference and the errors say them."""
        if self.kind == "number":
            return f"{'a whole number ' if self.integer else ''}in {self.range}"
        if self.kind == "text":
            return "a string"
        words = ["true", "false"] if self.kind == "switch" else []
        options = [*words, *(repr(c) for c in self.choices)]
        return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


def _bound(text: str) -> float | str:
    return text if text == MODELS else float(text)
