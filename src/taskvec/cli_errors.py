"""One clear line on stderr, never a traceback: the error handling every command shares."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from taskvec.errors import TaskvecError

F = TypeVar("F", bound=Callable[..., Any])


def friendly(interrupted: str = "nothing was written") -> Callable[[F], F]:
    """Turn every expected failure of a command into one line on stderr and exit status 1
    (130 on Ctrl-C, with ``interrupted`` saying what state things are left in)."""

    def decorate(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TaskvecError as e:
                click.echo(f"taskvec: error: {e}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo(f"taskvec: interrupted; {interrupted}", err=True)
                sys.exit(130)
            except MemoryError:
                click.echo("taskvec: error: out of memory (try --threads 1)", err=True)
                sys.exit(1)
            except OSError as e:
                click.echo(f"taskvec: error: {e.filename or ''}: {e.strerror or e}", err=True)
                sys.exit(1)

        return wrapper  # type: ignore[return-value]

    return decorate
