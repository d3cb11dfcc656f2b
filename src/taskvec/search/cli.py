"""``taskvec search``: the command line of :func:`taskvec.search.run_search`."""

from __future__ import annotations

from pathlib import Path

import click

from taskvec.cli_errors import friendly
from taskvec.search.study import STRATEGIES, SearchSettings


@click.command("search")
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for study.db, best.yaml, report.json and the plots.",
)
@click.option(
    "--objective",
    required=True,
    help="bench:lite | bench:full | accuracy:<data> | module:function.",
)
@click.option("--strategy", type=click.Choice(STRATEGIES), default="tpe", show_default=True)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Trials in the study (with --resume: in all, the earlier ones included).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Evaluators; more than one run as Ray actors (ray.init() on this machine).",
)
@click.option("--address", default=None, help="An existing Ray cluster (implies Ray).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads per worker (default: cores / workers).",
)
@click.option(
    "--per-task",
    is_flag=True,
    help="Every per-task score an objective: a Pareto front (tpe, nsga2, random, grid).",
)
@click.option("--grid-points", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the study in OUT/study.db.")
@click.option(
    "--save-model",
    type=click.Path(path_type=Path),
    default=None,
    help="Also merge the best config into this folder.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@friendly("the study so far is in OUT/study.db: --resume continues it")
def search_cmd(
    config: Path,
    out: Path,
    objective: str,
    strategy: str,
    trials: int,
    workers: int,
    address: str | None,
    threads: int | None,
    per_task: bool,
    grid_points: int,
    seed: int,
    resume: bool,
    save_model: Path | None,
    no_progress: bool,
) -> None:
    """Find the values of CONFIG's `{search: ...}` markers that maximise an objective on
    validation data; the best config goes to OUT/best.yaml, the best point is scored on the
    objective's held-out split once (see docs/search.md)."""
    from taskvec.search.run import run_search

    settings = SearchSettings(
        objective, strategy, trials, workers, address, threads, seed, per_task, grid_points, resume
    )
    run_search(
        config, out, settings, save_model=save_model, progress=not no_progress, echo=click.echo
    )
