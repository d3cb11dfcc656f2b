"""``taskvec twin build``: the command-line form of :func:`taskvec.twin.build.build_twin`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from taskvec.cli_errors import friendly
from taskvec.cli_experts import expert_labels, experts_arguments
from taskvec.cli_params import method_parameters
from taskvec.twin.build import DEFAULT_FRACTION, DEFAULT_SCALE, RouterDataError

_friendly = friendly()


def task_data(items: tuple[str, ...]) -> dict[str, str]:
    """``TASK=PATH`` items as task → data source; one line for an item with no task label."""
    out: dict[str, str] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise RouterDataError(f"--data {item!r}: router data needs a task label, TASK=PATH")
        if task in out:
            raise RouterDataError(f"--data gives task {task!r} twice")
        out[task] = path
    return out


@click.group("twin")
def twin() -> None:
    """Twin-Merging: shared merge + low-rank exclusive knowledge, routed per input."""


@twin.command("build")
@experts_arguments
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Twin folder.")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="TASK=PATH: the router's labelled inputs of one task (any form taskvec reads).",
)
@click.option(
    "--shared",
    type=click.Path(path_type=Path),
    default=None,
    help="A merged model to use as θ* (default: task arithmetic).",
)
@click.option(
    "--method",
    default=None,
    help="A per-tensor merge method for θ* (default: task arithmetic at --scale).",
)
@click.option("--param", "params", multiple=True, help="A parameter of --method, KEY=VALUE.")
@click.option(
    "--scale",
    type=float,
    default=DEFAULT_SCALE,
    show_default=True,
    help="λ of the task-arithmetic θ*.",
)
@click.option(
    "--fraction",
    type=float,
    default=DEFAULT_FRACTION,
    show_default=True,
    help="Share of singular values kept per 2-D tensor.",
)
@click.option(
    "--examples",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Router inputs per task.",
)
@click.option("--max-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Router initialisation seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_friendly
def build_cmd(
    base: Path,
    experts: tuple[Path, ...],
    out: Path,
    data: tuple[str, ...],
    names: str | None,
    shared: Path | None,
    method: str | None,
    params: tuple[str, ...],
    scale: float,
    fraction: float,
    examples: int,
    max_len: int,
    seed: int,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Build a twin folder over BASE from EXPERTS: θ*, the factors of each θₜ − θ*, a router."""
    from taskvec.forward import set_threads
    from taskvec.twin.build import build_twin

    labels = expert_labels(names, experts)
    set_threads(threads)
    path = build_twin(
        base,
        dict(zip(labels, experts, strict=True)),
        task_data(data),
        out,
        shared=shared,
        method=method,
        parameters=method_parameters(params),
        scale=scale,
        fraction=fraction,
        examples=examples,
        max_len=max_len,
        seed=seed,
        overwrite=overwrite,
        progress=not no_progress,
    )
    extra = json.loads((path / "twin.json").read_text())["extra_bytes"]
    click.echo(f"saved twin merge of {len(labels)} tasks to {out} ({extra} bytes of factors)")
