"""One clear line on stderr, never a traceback: the error handling every command shares.

SIGTERM (sent by ``timeout``, systemd, Slurm) stops a command as Ctrl-C does: it raises
:class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, so the same clean-up runs (an
unfinished output is removed), and the command exits with status 143.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import click

from taskvec.errors import TaskvecError

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up
    raise Terminated


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` meanwhile (handlers live in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def friendly(
    interrupted: str | Callable[..., str] = "nothing was written",
) -> Callable[[F], F]:
    """Turn every expected failure of a command into one line on stderr and exit status 1
    (130 on Ctrl-C, 143 on SIGTERM, with ``interrupted`` saying what state things are left
    in: a string, or a function of the command's keyword arguments giving one)."""

    def decorate(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                with _sigterm_interrupts():
                    return fn(*args, **kwargs)
            except TaskvecError as e:
                click.echo(f"taskvec: error: {e}", err=True)
                sys.exit(1)
            except KeyboardInterrupt as e:
                state = interrupted(**kwargs) if callable(interrupted) else interrupted
                term = isinstance(e, Terminated)
                how, code = ("terminated", 143) if term else ("interrupted", 130)
                click.echo(f"taskvec: {how}; {state}", err=True)
                sys.exit(code)
            except BrokenPipeError:  # the reader went away (`taskvec info ... | head`): quietly
                _silence_stdout()
                sys.exit(1)
            except MemoryError:
                click.echo("taskvec: error: out of memory (try --threads 1)", err=True)
                sys.exit(1)
            except OSError as e:
                click.echo(f"taskvec: error: {e.filename or ''}: {e.strerror or e}", err=True)
                sys.exit(1)

        return wrapper  # type: ignore[return-value]

    return decorate


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail a second time
    (Python's documented recipe for EPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
