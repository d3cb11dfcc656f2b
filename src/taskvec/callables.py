"""``module:function`` strings: user code named in a config or on the command line."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from taskvec.errors import ConfigError


def import_callable(spec: str, error: type[ConfigError] = ConfigError) -> Callable[..., Any]:
    """The function ``spec`` (``package.module:function``) names; one line (``error``) when
    the module cannot be imported or has no such function."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise error(f"{spec}: name a function as module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import can fail with anything the module raises
        raise error(f"{spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise error(f"{spec}: {module_name} has no function {function!r}")
    return fn
