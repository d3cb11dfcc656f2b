"""Fault injection for the reliability tests: stop this process at a named point of a run.

``TASKVEC_FAULT=<point>:<n>[:TERM]`` makes the *n*-th arrival at ``point`` kill the process
with SIGKILL (or send it SIGTERM). The writer and the merge call :func:`reached` at
``piece-written`` (a piece's bytes are in its file), ``journal-flushed`` (a resumable output's
journal is durable), ``first-pass`` (one tensor of a whole-model pass is done),
``first-pass-done``, ``before-rename`` and ``after-rename`` (the output's commit). Without the
variable :func:`reached` does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

_spec = os.environ.get("TASKVEC_FAULT", "").split(":")
_POINT = _spec[0] or None
_AT = int(_spec[1]) if len(_spec) > 1 else 1
_SIGNAL = signal.SIGTERM if _spec[2:] == ["TERM"] else signal.SIGKILL
_arrivals = 0
_lock = threading.Lock()


def reached(point: str) -> None:
    """Count an arrival at ``point``; the configured one sends the configured signal."""
    global _arrivals
    if point != _POINT:
        return
    with _lock:
        _arrivals += 1
        fire = _arrivals == _AT
    if fire:
        os.kill(os.getpid(), _SIGNAL)
