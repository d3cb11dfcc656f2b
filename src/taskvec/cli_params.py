"""``KEY=VALUE`` command-line items: method parameters (``--param``), scores, members."""

from __future__ import annotations

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
    """``--param KEY=VALUE`` items: numbers as floats, anything else as text."""
    out: dict[str, float | str] = {}
    for key, value in key_values(values, "--param").items():
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out
