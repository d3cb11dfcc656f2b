"""``KEY=VALUE`` command-line items: method parameters (``--param``), scores, members."""

from __future__ import annotations

import math

from taskvec.errors import ConfigError


def key_values(values: tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; one line naming ``what`` for an item without ``=``."""
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {v!r}: expected KEY=VALUE")
        out[key] = value
    return out


def method_parameters(values: tuple[str, ...]) -> dict[str, float | str]:
    """``--param KEY=VALUE`` items: numbers as floats, anything else as text; a NaN or an
    infinity (``nan``, ``inf``, ``1e999``) is refused in one line."""
    out: dict[str, float | str] = {}
    for key, value in key_values(values, "--param").items():
        try:
            out[key] = _finite(key, value, "--param")
        except ValueError:
            out[key] = value
    return out


def scores(values: tuple[str, ...]) -> dict[str, float]:
    """``--score NAME=VALUE`` items as finite numbers; anything else is refused in one line."""
    out = {}
    for key, value in key_values(values, "--score").items():
        try:
            out[key] = _finite(key, value, "--score")
        except ValueError:
            raise ConfigError(f"--score {key}={value}: not a number") from None
    return out


def _finite(key: str, value: str, what: str) -> float:
    """``value`` as a float (ValueError if it is no number); a NaN or infinity is refused."""
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{what} {key}={value}: not a finite number")
    return number
