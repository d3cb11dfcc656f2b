"""The ``taskvec`` command line: a thin layer over the Python API."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Any

import click

from taskvec.algebra import Model, TaskVector, apply, is_structural, load, load_model
from taskvec.cli_errors import friendly
from taskvec.engine import default_threads, planned_tensors
from taskvec.errors import CheckpointError, OutputError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.dtypes import dtype_name
from taskvec.io.manifest import verify as verify_output
from taskvec.io.output_siblings import partial_folder
from taskvec.io.writer import DEFAULT_SHARD_SIZE
from taskvec.merge import MergePlan
from taskvec.merge import merge as run_merge

log = logging.getLogger("taskvec")


_friendly = friendly()


def _merge_interrupted(out: Path, resume: bool, **_: Any) -> str:
    """What an interrupted merge leaves."""
    if not resume:
        return "nothing was written"
    kept = partial_folder(out.expanduser().absolute())
    return f"the finished part is kept in {kept}; run the same command again to continue"


_threads = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help=f"Worker threads (default: the usable cores, here {default_threads()}).",
)
_overwrite = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
_dtype = click.option(
    "--dtype", default=None, help="Output dtype (float32, float16, bfloat16). Default: the inputs'."
)
_shard = click.option(
    "--shard-size",
    default=str(DEFAULT_SHARD_SIZE),
    show_default=True,
    help="Largest output shard, e.g. 2GB or 500MB.",
)
_quiet = click.option("--no-progress", is_flag=True, help="Hide progress bars.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="taskvec")
def main(verbose: int) -> None:
    """Merge and edit fine-tuned models through their task vectors, streamed tensor by tensor."""
    # The modules imported so far (torch's million objects) live until exit: keep them out of
    # the cyclic collector, which would rescan them in every full collection and at exit
    # (0.4 s of a command's wall time on this machine).
    gc.freeze()
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="taskvec: %(message)s")


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and print the plan from headers only.")
@_threads
@_overwrite
@_shard
@click.option("--random-seed", type=int, default=None, help="Seed for random methods (DARE...).")
@click.option("--device", default="cpu", show_default=True, help="Where methods compute (cuda).")
@click.option(
    "--resume",
    is_flag=True,
    help="Build OUT resumably: a run that is interrupted or killed keeps its finished part, "
    "and the same command continues it.",
)
@_quiet
@friendly(_merge_interrupted)
def merge(
    config: Path,
    out: Path,
    dry_run: bool,
    threads: int | None,
    overwrite: bool,
    shard_size: str,
    random_seed: int | None,
    device: str,
    resume: bool,
    no_progress: bool,
) -> None:
    """Merge the models of a mergekit-style YAML CONFIG into the folder OUT."""
    plan = run_merge(
        config,
        out,
        dry_run=dry_run,
        threads=threads,
        overwrite=overwrite,
        shard_size=shard_size,
        random_seed=random_seed,
        progress=not no_progress,
        device=device,
        resume=resume,
    )
    name = plan.method.name
    if not dry_run:
        if not isinstance(plan, MergePlan):  # a whole-model pipeline method
            click.echo(f"wrote {plan.method.output} with {name} to {out}")
            return
        n_tensors = len(planned_tensors(plan.jobs))  # jobs are row chunks of tensors
        click.echo(f"merged {n_tensors} tensors with {name} into {out}")
        return
    click.echo(f"plan: {name} -> {out}")
    lines = (
        [*plan.summary(threads or default_threads()).lines(), *plan.config_lines(), *plan.notes]
        if isinstance(plan, MergePlan)
        else plan.lines()
    )
    for line in lines:
        click.echo(f"  {line}")
    if plan.problems:
        click.echo(f"{len(plan.problems)} problem(s) would stop this merge:", err=True)
        for p in plan.problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(1)
    click.echo("OK: no problems found (nothing was written)")


def _save_options(
    dtype: str | None, shard_size: str, threads: int | None, overwrite: bool, no_progress: bool
) -> dict[str, Any]:
    """The keyword arguments of ``save`` from the shared output options."""
    return {
        "dtype": dtype,
        "shard_size": shard_size,
        "threads": threads,
        "overwrite": overwrite,
        "progress": not no_progress,
    }


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("finetuned", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_dtype
@_shard
@_threads
@_overwrite
@_quiet
@_friendly
def diff(
    base: Path,
    finetuned: Path,
    out: Path,
    dtype: str | None,
    shard_size: str,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Extract the task vector FINETUNED − BASE into OUT."""
    tau = load_model(finetuned) - load_model(base)
    tau.save(out, **_save_options(dtype, shard_size, threads, overwrite, no_progress))
    click.echo(f"saved task vector ({len(tau.names)} tensors) to {out}")


@main.command("apply")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("vectors", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: the last argument, as in `taskvec apply BASE TV... OUT`).",
)
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="λ in base + λ·Σ τ (negative to subtract: unlearning).",
)
@click.option(
    "--any-base",
    is_flag=True,
    help="Apply task vectors extracted from another base (same tensor names and shapes).",
)
@_dtype
@_shard
@_threads
@_overwrite
@_quiet
@_friendly
def apply_cmd(
    base: Path,
    vectors: tuple[Path, ...],
    out: Path | None,
    scale: float,
    any_base: bool,
    dtype: str | None,
    shard_size: str,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Apply task vectors to BASE: OUT = BASE + scale · Σ VECTORS (BASE TV... OUT, or -o OUT).

    A task vector extracted from another base than BASE (by content fingerprint) is refused
    unless --any-base."""
    if out is None:
        if len(vectors) < 2:
            raise click.UsageError("give BASE, at least one task vector, and OUT (or -o OUT)")
        *rest, out = vectors
        vectors = tuple(rest)
    taus = []
    for v in vectors:
        loaded = load(v)
        if not isinstance(loaded, TaskVector):
            raise CheckpointError(
                f"{v}: is a model, not a task vector (make one with taskvec diff)"
            )
        taus.append(loaded)
    model = apply(load_model(base), taus, scale, allow_other_base=any_base)
    model.save(out, **_save_options(dtype, shard_size, threads, overwrite, no_progress))
    click.echo(f"saved {base} + {scale:g}·Σ({len(taus)} task vectors) to {out}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@_friendly
def info(path: Path, show_tensors: bool) -> None:
    """Describe a checkpoint or task vector from its headers."""
    ckpt = open_checkpoint(path)
    obj: Model | TaskVector = load(path)
    kind = "task vector" if isinstance(obj, TaskVector) else "model"
    dtypes: dict[str, int] = {}
    params = 0
    for i in ckpt.tensors.values():
        dtypes[dtype_name(i.dtype)] = dtypes.get(dtype_name(i.dtype), 0) + 1
        params += i.numel
    files = sorted({i.file.name for i in ckpt.tensors.values()})
    click.echo(f"{path}: {kind}")
    click.echo(f"  tensors:    {len(ckpt)} in {len(files)} file(s)")
    click.echo(f"  parameters: {params:,}")
    click.echo(f"  size:       {ckpt.nbytes / 1e9:.3f} GB")
    click.echo("  dtypes:     " + ", ".join(f"{k} ×{v}" for k, v in sorted(dtypes.items())))
    cfg = ckpt.config
    if cfg:
        arch = ",".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
        click.echo(f"  config:     {arch}")
    if isinstance(obj, Model):
        click.echo(f"  fingerprint: {obj.fingerprint()}")  # hashes the bytes once, then cached
    elif (fp := ckpt.metadata.get("taskvec.base_fingerprint")) is not None:
        old = " (structural: names and shapes only, older taskvec)" if is_structural(fp) else ""
        click.echo(f"  base fingerprint: {fp}{old}")
        if (base_path := ckpt.metadata.get("taskvec.base_path")) is not None:
            click.echo(f"  base path:  {base_path}")
    if show_tensors:
        for name, i in ckpt.tensors.items():
            click.echo(f"  {name}  {list(i.shape)}  {dtype_name(i.dtype)}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--inputs", is_flag=True, help="Also check the inputs' weights are unchanged.")
@_friendly
def verify(out: Path, inputs: bool) -> None:
    """Check the output folder OUT against its manifest: every tensor's checksum, the shard
    headers and the other files. Prints one line per problem; exit status 1 if any."""
    problems, checked = verify_output(out, inputs=inputs)
    for line in problems:
        click.echo(line)
    if problems:
        raise OutputError(f"{out}: {len(problems)} problem(s) found in {checked} tensor(s)")
    click.echo(f"{out}: OK ({checked} tensors match the manifest)")


@main.command("emr")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("finetuned", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="EMR folder.")
@click.option("--names", default=None, help="Comma-separated task names (default: folder names).")
@_threads
@_overwrite
@_quiet
@_friendly
def emr_cmd(
    base: Path,
    finetuned: tuple[Path, ...],
    out: Path,
    names: str | None,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """EMR-merge FINETUNED models: a unified task vector plus a mask and scale per task
    (the command-line form of ``merge_method: emr``)."""
    from taskvec.emr import emr_merge, task_vectors

    labels = names.split(",") if names else [p.name for p in finetuned]
    if len(labels) != len(finetuned) or len(set(labels)) != len(labels):
        raise CheckpointError("--names must give one distinct name per fine-tuned model")
    vectors = task_vectors(base, dict(zip(labels, finetuned, strict=True)))
    emr_merge(vectors, out, overwrite=overwrite, threads=threads, progress=not no_progress)
    click.echo(f"saved EMR merge of {len(vectors)} tasks to {out}")


@main.command("emr-task")
@click.argument("emr_dir", type=click.Path(path_type=Path))
@click.argument("task")
@click.argument("base", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@_dtype
@_threads
@_overwrite
@_quiet
@_friendly
def emr_task_cmd(
    emr_dir: Path,
    task: str,
    base: Path,
    out: Path,
    dtype: str | None,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Materialise TASK's model from an EMR folder: BASE + λ_t M_t ⊙ τ_uni."""
    from taskvec.emr import emr_task_vector

    model = load_model(base) + emr_task_vector(emr_dir, task)
    model.save(out, dtype=dtype, threads=threads, overwrite=overwrite, progress=not no_progress)
    click.echo(f"saved the {task!r} model to {out}")


@main.command("stats")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--kind", type=click.Choice(["gram", "fisher"]), required=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--column", default=None, help="The text column (default: text).")
@click.option("--examples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True)
@click.option(
    "--fisher-variant",
    type=click.Choice(["example", "batch"]),
    default="example",
    show_default=True,
    help="example: per-example squared gradients (the paper's); batch: FusionBench's squared "
    "batch-summed gradients.",
)
@click.option(
    "--head",
    type=click.Choice(["auto", "base", "classification", "causal-lm"]),
    default="auto",
    show_default=True,
    help="The model class to load (auto: from config.json's architectures).",
)
@_threads
@_overwrite
@_friendly
def stats_cmd(
    model: Path,
    data: str,
    kind: str,
    out: Path,
    column: str | None,
    examples: int,
    batch_size: int,
    max_length: int,
    fisher_variant: str,
    head: str,
    threads: int | None,
    overwrite: bool,
) -> None:
    """Gram matrices XᵀX/N of every Linear input, or the diagonal Fisher, of MODEL on DATA (a
    datasets folder, a .jsonl/.csv/.txt file[:column], or module:function), written to OUT."""
    from taskvec.forward import set_threads
    from taskvec.stats import StatsSettings, compute_statistics

    set_threads(threads)
    settings = StatsSettings(kind, examples, batch_size, max_length, fisher_variant, head)  # type: ignore[arg-type]
    done = compute_statistics(model, data, out, settings, column=column, overwrite=overwrite)
    click.echo(
        f"saved {kind} statistics ({done['tensors']} tensors, {done['bytes'] / 1e6:.1f} MB) "
        f"to {out} in {done['seconds']:.1f} s"
    )


@main.command("methods")
@click.option("--markdown", is_flag=True, help="Print the full reference as Markdown.")
def methods_cmd(markdown: bool) -> None:
    """List the merge methods with their formulas and parameters."""
    from taskvec.methods.reference import method_reference, method_table

    click.echo(method_reference() if markdown else method_table())


def _register_optional_commands() -> None:
    """Commands that live with their feature (the benchmark harness)."""
    try:
        from taskvec.bench.cli import bench
        from taskvec.bench.demo import demo
        from taskvec.fda.cli import fda
    except ImportError:
        return
    main.add_command(demo)
    main.add_command(bench)
    main.add_command(fda)


_register_optional_commands()


def _register_search_command() -> None:
    """Coefficient search (``taskvec search``), which lives with its feature."""
    from taskvec.search.cli import search_cmd

    main.add_command(search_cmd)


_register_search_command()


def _register_store_commands() -> None:
    """The task-vector store (``taskvec store ...``) and LoRA extraction."""
    from taskvec.store.cli import extract_lora_cmd, store

    main.add_command(store)
    main.add_command(extract_lora_cmd)


_register_store_commands()


def _register_analyze_command() -> None:
    """The task-vector analysis report (``taskvec analyze``)."""
    from taskvec.analyze.cli import analyze_cmd

    main.add_command(analyze_cmd)


_register_analyze_command()


def _register_twin_command() -> None:
    """Twin-Merging (``taskvec twin build``)."""
    from taskvec.twin.cli import twin

    main.add_command(twin)


_register_twin_command()

if __name__ == "__main__":
    main()
