"""``taskvec fda``: construct anchors, adapt a model on them, analyse them (thin commands over
:mod:`taskvec.fda.pipeline` and :mod:`taskvec.fda.analysis`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from taskvec.cli_errors import friendly
from taskvec.cli_experts import expert_labels, experts_arguments

_friendly = friendly("finished blocks' anchor files are kept and reused by a rerun")


def open_fda(
    base: Path,
    experts: tuple[Path, ...],
    names: str | None,
    threads: int | None,
    device: str = "cpu",
) -> Any:
    """The :class:`~taskvec.fda.pipeline.FDA` of the command line's models, threads set."""
    from taskvec.fda.pipeline import FDA
    from taskvec.forward import set_threads

    set_threads(threads)
    return FDA(base, dict(zip(expert_labels(names, experts), experts, strict=True)), device)


def _block_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(b) for b in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


_blocks = click.option(
    "--blocks",
    default=None,
    callback=_block_list,
    help="Comma-separated block indices (default: all).",
)
_device = click.option(
    "--device", default="cpu", show_default=True, help="Where blocks run (e.g. cuda)."
)


@click.group("fda")
def fda() -> None:
    """FDA (functional dual anchors): construct per-block anchors from experts, adapt a model
    on them, and analyse them."""


@fda.command()
@experts_arguments
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Anchor folder (one block-<l>.safetensors per block; reused when rerun).",
)
@click.option(
    "--init",
    type=click.Choice(["gauss", "weight"]),
    default="gauss",
    show_default=True,
    help="Scaled Gaussian noise, or rows of the experts' weights.",
)
@click.option(
    "--anchors",
    "n_anchors",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Anchors per task and block.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per anchor (default: 5 for encoders and ViT; decoder MLPs have none).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="AdamW steps per block (the reference uses 1200).",
)
@click.option("--lr", type=float, default=1e-2, show_default=True)
@click.option("--sigma", type=float, default=0.01, show_default=True, help="Gauss init scale.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--snapshots",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Anchor snapshots kept for `taskvec fda analyze` (log-spaced steps).",
)
@_blocks
@_device
@_friendly
def construct(
    base: Path,
    experts: tuple[Path, ...],
    names: str | None,
    threads: int | None,
    no_progress: bool,
    out: Path,
    init: str,
    n_anchors: int,
    tokens: int | None,
    steps: int,
    lr: float,
    sigma: float,
    seed: int,
    snapshots: int,
    blocks: list[int] | None,
    device: str,
) -> None:
    """Build every expert's anchors for every block of BASE (double back-propagation)."""
    from taskvec.fda.anchors import AnchorSettings

    settings = AnchorSettings(
        n_anchors,
        tokens,
        steps,
        lr,
        init,
        sigma,
        seed,  # type: ignore[arg-type]
        snapshots,
    )
    runner = open_fda(base, experts, names, threads, device)
    report = runner.construct(
        out, settings, blocks=blocks, progress=not no_progress, echo=click.echo
    )
    click.echo(f"anchors in {out} ({sum(report.seconds.values()):.0f} s)")


@fda.command()
@experts_arguments
@click.option(
    "--anchors",
    "anchor_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The folder `taskvec fda construct` wrote.",
)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output model.")
@click.option(
    "--start",
    default="base",
    show_default=True,
    help="base (train every block parameter from BASE), task_arithmetic (train the "
    "element-wise coefficients of the experts' task vectors) or a merged model folder "
    "(train the coefficients of its one task vector).",
)
@click.option(
    "--scaling",
    type=float,
    default=None,
    help="Initial coefficient (default 0.3 for task_arithmetic, 1.0 for a merge).",
)
@click.option("--loss", type=click.Choice(["mse", "cos"]), default="mse", show_default=True)
@click.option(
    "--lr",
    type=float,
    default=5e-5,
    show_default=True,
    help="Adam learning rate when training parameters.",
)
@click.option(
    "--coef-lr",
    type=float,
    default=1e-2,
    show_default=True,
    help="Adam learning rate when training coefficients.",
)
@click.option("--epochs", type=click.IntRange(min=0), default=125, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_device
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the per-block timings as JSON here.",
)
@_friendly
def adapt(
    base: Path,
    experts: tuple[Path, ...],
    names: str | None,
    threads: int | None,
    no_progress: bool,
    anchor_dir: Path,
    out: Path,
    start: str,
    scaling: float | None,
    loss: str,
    lr: float,
    coef_lr: float,
    epochs: int,
    batch: int,
    seed: int,
    overwrite: bool,
    device: str,
    report: Path | None,
) -> None:
    """Adapt BASE (or a merge) on the anchors of EXPERTS and write a normal checkpoint."""
    from taskvec.fda.adapt import AdaptSettings
    from taskvec.fda.pipeline import Start

    settings = AdaptSettings(loss, lr, coef_lr, epochs, batch, seed)  # type: ignore[arg-type]
    how = Start.parse(start, scaling)
    runner = open_fda(base, experts, names, threads, device)
    done = runner.adapt(
        anchor_dir,
        out,
        how,
        settings,
        overwrite=overwrite,
        progress=not no_progress,
        echo=click.echo,
    )
    if report is not None:
        report.write_text(json.dumps({"seconds": done.seconds}, indent=2) + "\n")


@fda.command()
@click.option(
    "--anchors",
    "anchor_dirs",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    multiple=True,
    required=True,
    help="An anchor folder (`taskvec fda construct -o`); repeat to compare (e.g. both inits).",
)
@click.option(
    "--benchmark",
    default="full",
    show_default=True,
    help="The benchmark whose base, experts and training texts are used.",
)
@_blocks
@_device
@click.option(
    "--real-examples",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Training texts per task whose block inputs are the real data.",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="k of the top-k subspace overlap and of the spectrum's tail energy.",
)
@click.option(
    "--cone-batches",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Real-data updates (mini-batches) spanning the cone.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads (default: the cores not busy now).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for fda-spectrum.png, fda-subspace.png, fda-cone.png and fda-analysis.json.",
)
@friendly()
def analyze(
    anchor_dirs: tuple[Path, ...],
    benchmark: str,
    blocks: list[int] | None,
    real_examples: int,
    rank: int,
    cone_batches: int,
    seed: int,
    threads: int | None,
    out: Path,
    device: str,
) -> None:
    """Spectrum, alignment with real inputs over optimisation, and cone energy of the anchors
    (the FDA paper's three observations), against the benchmark's training data."""
    from taskvec.bench import fda_rows  # the benchmark's models and data (CLI glue only)
    from taskvec.fda import analysis
    from taskvec.forward import set_threads

    set_threads(threads)
    settings = analysis.AnalysisSettings(rank, cone_batches, seed)
    sources = fda_rows.benchmark_sources(benchmark, real_examples)
    result = analysis.analyze(
        sources, anchor_dirs, out, settings, blocks=blocks, device=device, echo=click.echo
    )
    click.echo(f"wrote {', '.join(analysis.FILES)} to {out} ({result['seconds']:.0f} s)")
