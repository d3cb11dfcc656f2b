"""Where taskvec keeps what it can recompute: benchmark data, experts, content fingerprints."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TASKVEC_CACHE"


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``path``, else ``$TASKVEC_CACHE``, else ``~/.cache/taskvec``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "taskvec"
