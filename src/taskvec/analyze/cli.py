"""``taskvec analyze BASE MODELS... -o REPORT``: the command line of
:func:`taskvec.analyze.analyze`."""

from __future__ import annotations

from pathlib import Path

import click

from taskvec.analyze import DEFAULT_FRACTIONS, DEFAULT_TOL, analyze, plan_analysis
from taskvec.analyze.spectra import sampled_layers
from taskvec.cli_errors import friendly
from taskvec.engine import default_threads


def _fractions(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    if value.strip().lower() == "none":
        return ()
    try:
        out = tuple(float(v) / 100 for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of percentages"
        ) from None
    if not all(0 < f <= 1 for f in out):
        raise click.BadParameter(f"{value!r}: each percentage must be in (0, 100]")
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


@click.command("analyze")
@click.argument("paths", nargs=-1, metavar="BASE MODELS...", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Report folder.")
@click.option("--names", default=None, help="Comma-separated task names (default: folder names).")
@click.option(
    "--merged",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A merged model to place on the PCA plot (repeatable).",
)
@click.option(
    "--merge",
    "merge_config",
    type=click.Path(path_type=Path),
    default=None,
    help="A merge config: where its inputs conflict most (its base/models fill in BASE/MODELS).",
)
@click.option("--spectra", is_flag=True, help="Singular spectra of 2-D tensors in sampled layers.")
@click.option(
    "--spectra-layers",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="How many layers --spectra samples (evenly spaced).",
)
@click.option(
    "--spectra-rank",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="k of the top-k subspaces compared between tasks.",
)
@click.option(
    "--top-k",
    "fractions",
    default=",".join(f"{100 * f:g}" for f in DEFAULT_FRACTIONS),
    show_default=True,
    callback=_fractions,
    help="Percentages of the top-k magnitude masks compared (Jaccard); none: no masks and one "
    "streamed pass instead of two.",
)
@click.option(
    "--zero-tol",
    type=click.FloatRange(min=0),
    default=DEFAULT_TOL,
    show_default=True,
    help="|τ| at most this counts as unchanged (near-zero, and for sign conflicts).",
)
@click.option("--dry-run", is_flag=True, help="Check the inputs from headers and print the plan.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help=f"Worker threads (default: the usable cores, here {default_threads()}).",
)
@click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@friendly()
def analyze_cmd(
    paths: tuple[Path, ...],
    out: Path | None,
    names: str | None,
    merged: tuple[Path, ...],
    merge_config: Path | None,
    spectra: bool,
    spectra_layers: int,
    spectra_rank: int,
    fractions: tuple[float, ...],
    zero_tol: float,
    dry_run: bool,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Norms, cosines, sign conflicts, mask overlaps, PCA (and spectra) of the task vectors of
    MODELS (fine-tuned models or saved task vectors) over BASE: PATHS is BASE MODELS..., or
    nothing with --merge. Writes OUT/index.html and OUT/analysis.json (see docs/analysis.md)."""
    base, models = (paths[0], list(paths[1:])) if paths else (None, [])
    labels = names.split(",") if names else None
    if out is None and not dry_run:
        raise click.UsageError("give the report folder with -o OUT (or --dry-run)")
    if dry_run:
        from taskvec.analyze.report import check_out

        plan = plan_analysis(base, models, list(merged), labels, merge_config)
        inputs = plan.inputs
        if out is not None:
            check_out(out, inputs, overwrite)
        layers = inputs.layout.num_layers
        click.echo(f"plan: analyze {len(inputs.tasks)} task vector(s) -> {out}")
        click.echo(f"  task vectors: {', '.join(inputs.tasks)}")
        if inputs.merged:
            click.echo(f"  merged:       {', '.join(inputs.merged)}")
        click.echo(f"  tensors:      {len(inputs.names)} ({len(inputs.left_out)} left out)")
        click.echo(f"  parameters:   {inputs.parameters:,} per vector, {layers} layers")
        passes = "twice (the masks need a second pass)" if fractions else "once"
        click.echo(f"  bytes read:   {_gb(inputs.read_bytes())}, {passes}")
        click.echo(f"  top-k masks:  {', '.join(f'{100 * f:g} %' for f in fractions) or 'none'}")
        if spectra:
            click.echo(f"  spectra:      layers {sampled_layers(layers, spectra_layers)}")
        if plan.merge_members:
            merge_names = [list(inputs.tasks)[i] for i in plan.merge_members]
            click.echo(f"  merge inputs: {', '.join(merge_names)}")
        click.echo("OK: no problems found (nothing was written)")
        return
    result = analyze(
        base,
        models,
        out,
        merged=list(merged),
        names=labels,
        tol=zero_tol,
        fractions=fractions,
        spectra_layers=spectra_layers if spectra else 0,
        spectra_rank=spectra_rank,
        merge_config=merge_config,
        threads=threads,
        overwrite=overwrite,
        progress=not no_progress,
    )
    n = len(result["tasks"])
    pairs = [
        (result["pairwise"]["cosine"][a][b], result["tasks"][a], result["tasks"][b])
        for a in range(n)
        for b in range(a + 1, n)
    ]
    if pairs:
        cos, a, b = max(pairs)
        click.echo(f"most aligned pair: {a} · {b} (cosine {cos:.3f})")
    click.echo(f"wrote {out}/index.html and analysis.json in {result['seconds']:.1f} s")
