"""Arguments shared by the commands that work on a base and its experts (``fda``, ``twin``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from taskvec.errors import IncompatibleError

F = TypeVar("F", bound=Callable[..., Any])


def experts_arguments(fn: F) -> F:
    """BASE EXPERTS... with --names, --threads and --no-progress."""
    options = [
        click.argument("base", type=click.Path(path_type=Path)),
        click.argument("experts", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option(
            "--names",
            default=None,
            help="Comma-separated task names (default: the expert folders' names).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Torch threads (default: the cores not busy now).",
        ),
        click.option("--no-progress", is_flag=True, help="Hide progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def expert_labels(names: str | None, experts: tuple[Path, ...]) -> list[str]:
    """The task name of each expert: ``--names`` (comma-separated) or the folders' names."""
    labels = names.split(",") if names else [p.name for p in experts]
    if len(labels) != len(experts) or len(set(labels)) != len(labels):
        raise IncompatibleError("--names must give one distinct name per expert")
    return labels
