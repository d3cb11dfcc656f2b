"""``taskvec bench``: build the benchmark, score merge configs, run the method sweep, report.

Thin commands over :mod:`~taskvec.bench.build`, :mod:`~taskvec.bench.harness`,
:mod:`~taskvec.bench.suite` and :mod:`~taskvec.bench.results`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from taskvec.bench.config import PRESETS
from taskvec.cli_errors import friendly

F = TypeVar("F", bound=Callable[..., Any])


_friendly = friendly("finished steps are cached")


def _common(fn: F) -> F:
    options = [
        click.option(
            "--benchmark",
            "-b",
            type=click.Choice(sorted(PRESETS)),
            default="full",
            show_default=True,
            help="Which preset: full (7 candidate tasks, 200 steps) or lite (the demo's 3 tasks).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Data, experts and scores (default: $TASKVEC_CACHE, else ~/.cache/taskvec).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Torch threads (default: the cores not busy now; 1 beats 2 when another "
            "job holds a core).",
        ),
        click.option("--no-progress", is_flag=True, help="Hide progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open(benchmark: str, cache_dir: Path | None, threads: int | None, no_progress: bool) -> Any:
    from taskvec.bench.harness import Bench

    return Bench.open(benchmark, cache=cache_dir, threads=threads, progress=not no_progress)


@click.group("bench")
def bench() -> None:
    """The merging benchmark: MiniLM experts on real text tasks (see docs/benchmark.md)."""


@bench.command("build")
@_common
@_friendly
def build_cmd(
    benchmark: str, cache_dir: Path | None, threads: int | None, no_progress: bool
) -> None:
    """Fetch the data, fine-tune one expert per task and check each beats the base probe.

    Resumable: finished experts, probes and scores are reused from the cache. Prints each
    expert's margin over the frozen-base linear probe; a task under the bar is replaced by a
    reserve task. The first full build takes about half an hour on one core.
    """
    _open(benchmark, cache_dir, threads, no_progress)


@bench.command("eval")
@click.argument("configs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--split",
    type=click.Choice(["validation", "test"]),
    default="test",
    show_default=True,
    help="Tune on validation; report test.",
)
@click.option(
    "--keep",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep the merged model in this folder (one config only).",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write scores here.")
@_common
@_friendly
def eval_cmd(
    configs: tuple[Path, ...],
    split: str,
    keep: Path | None,
    json_out: Path | None,
    benchmark: str,
    cache_dir: Path | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Merge with each CONFIG and score the merge on every task with that task's head.

    A CONFIG is any `taskvec merge` YAML; it names the benchmark's models as `base`,
    `expert:<task>`, or `models: experts` for all experts (weight 1.0 each where the method
    takes weights). Prints per-task accuracy, the average (± binomial s.e.) and normalised
    accuracy (merged ÷ expert, averaged over tasks).
    """
    from taskvec.bench.demo import format_table

    if keep is not None and len(configs) > 1:
        raise click.UsageError("--keep takes one CONFIG")
    b = _open(benchmark, cache_dir, threads, no_progress)
    reference = b.built.reference(split)
    rows = {"experts (each on its own task)": reference}
    out: dict[str, Any] = {}
    for path in configs:
        run = b.run(path, split=split, label=path.stem, keep=keep)
        rows[path.stem] = run.result
        out[path.stem] = {
            "method": run.method,
            "parameters": run.parameters,
            "split": split,
            "acc": {t: round(s.accuracy, 4) for t, s in run.result.scores.items()},
            "stderr": {t: round(s.stderr, 4) for t, s in run.result.scores.items()},
            "avg": round(run.result.average, 4),
            "avg_stderr": round(run.result.average_stderr, 4),
            "normalized": round(run.normalized, 4),
            "normalized_stderr": round(run.normalized_stderr, 4),
            "seconds": round(run.merge_seconds, 1),
            "eval_seconds": round(run.eval_seconds, 1),
        }
        click.echo(
            f"{path.stem}: merged in {run.merge_seconds:.1f} s, scored in "
            f"{run.eval_seconds:.1f} s"
            + (" (an earlier run, from the cache)" if run.cached else "")
        )
    click.echo(format_table(rows, reference, b.tasks))
    click.echo(f"{split} accuracy in %; normalised = mean of accuracy ÷ the expert's.")
    if json_out is not None:
        json_out.write_text(json.dumps(out, indent=2) + "\n")


@bench.command("run")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Results JSON (default: benchmarks/results/bench-<benchmark>.json); the .md table "
    "and .png chart are written next to it.",
)
@click.option("--only", multiple=True, help="Run only these sweep labels (repeatable); see --list.")
@click.option("--list", "list_", is_flag=True, help="List the sweeps and exit.")
@click.option("--no-negation", is_flag=True, help="Skip the negation study.")
@click.option("--negation-only", is_flag=True, help="Run only the negation study.")
@_common
@_friendly
def run_cmd(
    out: Path | None,
    only: tuple[str, ...],
    list_: bool,
    no_negation: bool,
    negation_only: bool,
    benchmark: str,
    cache_dir: Path | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Run every method's sweep (coefficients chosen on validation, scored on test) and the
    negation study; write the results JSON, Markdown table and PNG chart."""
    from taskvec.bench.suite import SPECIALS, run_suite
    from taskvec.bench.sweeps import SWEEPS, available

    if list_:
        have, missing = available()
        for s in have:
            grid = ", ".join(f"{k} in {list(v)}" for k, v in s.grid.items()) or "no grid"
            click.echo(f"{s.label:<18} {s.method:<18} {dict(s.parameters)}  {grid}")
        for label, what in SPECIALS.items():
            click.echo(f"{label:<18} {what}")
        for line in missing:
            click.echo(f"cannot run: {line}")
        return
    sweeps = list(SWEEPS)
    specials: list[str] = [] if negation_only else list(SPECIALS)
    if only:
        unknown = set(only) - {s.label for s in SWEEPS} - set(SPECIALS)
        if unknown:
            raise click.UsageError(f"unknown sweep(s): {', '.join(sorted(unknown))}")
        sweeps = [s for s in SWEEPS if s.label in only]
        specials = [label for label in SPECIALS if label in only]
    if negation_only:
        sweeps = []
    b = _open(benchmark, cache_dir, threads, no_progress)
    path = out or Path("benchmarks/results") / f"bench-{benchmark}.json"
    run_suite(
        b,
        path,
        sweeps=sweeps,
        negation=not no_negation,
        specials=specials,
        update=bool(only or negation_only),
    )
    click.echo(f"wrote {path} and its .md / .png")


@bench.command("report")
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_friendly
def report_cmd(results: Path) -> None:
    """Regenerate the Markdown table and PNG chart of a results JSON."""
    from taskvec.bench.results import write_reports

    md, png = write_reports(json.loads(results.read_text()), results)
    click.echo(f"wrote {md} and {png}")
