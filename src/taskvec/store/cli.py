"""``taskvec store ...``: the task-vector store's commands (see :mod:`taskvec.store`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from taskvec.cli_errors import friendly
from taskvec.cli_params import key_values, method_parameters
from taskvec.cli_params import scores as finite_scores
from taskvec.errors import ConfigError
from taskvec.io.writer import DEFAULT_SHARD_SIZE
from taskvec.store.bundle import export_bundle, import_bundle
from taskvec.store.equip import equip, parse_terms
from taskvec.store.records import VectorRecord
from taskvec.store.store import RTVQ_OFFSETS, Store

_friendly = friendly()
_root = click.option(
    "--store",
    "root",
    type=click.Path(path_type=Path),
    default=None,
    help="The store folder (default: $TASKVEC_STORE, else ~/.cache/taskvec/store).",
)


@click.group("store")
def store() -> None:
    """Keep, share and equip task vectors: a catalogue (SQLite) of content-addressed blobs."""


@store.command("init")
@_root
@_friendly
def init_cmd(root: Path | None) -> None:
    """Create an empty store (a no-op on an existing one)."""
    s = Store(root, create=True)
    click.echo(f"store at {s.root}")


@store.command("add")
@click.argument("name")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None, help="The base model.")
@click.option(
    "--codec",
    default="exact",
    show_default=True,
    help="exact, int8|int4|int3|int2, topk/D, dare/P/sSEED, lowrank/rR|eF|tT, sign.",
)
@click.option("--group-size", type=int, default=None, help="Group size of intN codecs.")
@click.option("--minmax", is_flag=True, help="intN: asymmetric min-max groups (default absmax).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeat for more).")
@click.option("--description", default="", help="What the vector does.")
@click.option("--licence", default=None, help="The licence of the weights.")
@click.option("--parent", "parents", multiple=True, help="A stored vector this one comes from.")
@click.option("--statistics", type=click.Path(path_type=Path), default=None, help="A stats folder.")
@click.option("--score", "scores", multiple=True, help="An evaluation score, TASK=VALUE.")
@click.option("--replace", is_flag=True, help="Replace a vector of the same name.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Encoding threads.")
@_root
@_friendly
def add_cmd(
    name: str,
    source: Path,
    base: Path | None,
    codec: str,
    group_size: int | None,
    minmax: bool,
    tags: tuple[str, ...],
    description: str,
    licence: str | None,
    parents: tuple[str, ...],
    statistics: Path | None,
    scores: tuple[str, ...],
    replace: bool,
    threads: int | None,
    root: Path | None,
) -> None:
    """Encode the task vector SOURCE (a saved task vector, or a fine-tuned model or a PEFT
    LoRA adapter with --base) and record it as NAME."""
    if group_size is not None or minmax:
        if not codec.startswith("int") or "/" in codec:
            raise ConfigError("--group-size and --minmax go with a plain intN codec (e.g. int4)")
        codec = f"{codec}/g{group_size or 128}/{'minmax' if minmax else 'absmax'}/zstd"
    score_values = finite_scores(scores)
    rec = Store(root, create=True).add(
        name,
        source,
        base=base,
        codec=codec,
        description=description,
        tags=tags,
        licence=licence,
        parents=parents,
        statistics=statistics,
        scores=score_values,
        replace=replace,
        threads=threads,
    )
    click.echo(
        f"stored {name!r}: {len(rec.tensors)} tensors, {rec.codec}, {rec.bits:.3f} bits/param, "
        f"{rec.blob_bytes / 1e6:.1f} MB, relative error {rec.rel_error:.2e}"
    )


@store.command("add-rtvq")
@click.argument("shared")
@click.argument("members", nargs=-1, required=True)
@click.option("--base", type=click.Path(path_type=Path), default=None, help="The base model.")
@click.option("--shared-codec", default="int3", show_default=True, help="Codec of the average.")
@click.option("--codec", default=RTVQ_OFFSETS, show_default=True, help="Codec of each offset.")
@click.option("--licence", default=None, help="The licence of the weights.")
@click.option("--replace", is_flag=True, help="Replace vectors of the same names.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Encoding threads.")
@_root
@_friendly
def add_rtvq_cmd(
    shared: str,
    members: tuple[str, ...],
    base: Path | None,
    shared_codec: str,
    codec: str,
    licence: str | None,
    replace: bool,
    threads: int | None,
    root: Path | None,
) -> None:
    """RTVQ: store the average of MEMBERS (NAME=SOURCE ...) as SHARED (3 bits) and each member
    as its offset from it (2 bits)."""
    records = Store(root, create=True).add_rtvq(
        shared,
        key_values(members, "member"),
        base=base,
        shared_codec=shared_codec,
        codec=codec,
        licence=licence,
        replace=replace,
        threads=threads,
    )
    total = sum(r.blob_bytes for r in records)
    params = sum(r.params for r in records[1:])
    click.echo(
        f"stored {len(records) - 1} vectors on the shared base {shared!r}: "
        f"{8 * total / params:.3f} bits/param in all, {total / 1e6:.1f} MB"
    )


@store.command("calibrate")
@click.argument("name")
@click.argument("finetuned", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--as", "new_name", default=None, help="Record it under this name (default: NAME).")
@click.option("--column", default=None, help="The text column (default: text).")
@click.option("--examples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--head", type=click.Choice(["auto", "base", "classification", "causal-lm"]),
              default="auto", show_default=True)  # fmt: skip
@_root
@_friendly
def calibrate_cmd(
    name: str,
    finetuned: Path,
    data: str,
    new_name: str | None,
    column: str | None,
    examples: int,
    batch_size: int,
    max_length: int,
    steps: int,
    lr: float,
    head: str,
    root: Path | None,
) -> None:
    """BitDelta scale distillation of the sign vector NAME: fit its per-matrix scales so that
    the base plus it matches FINETUNED's outputs on DATA (a .jsonl/.csv/.txt file[:column],
    a datasets folder or module:function)."""
    from taskvec.store.calibrate import calibrate_signs

    rec, losses = calibrate_signs(
        Store(root),
        name,
        finetuned,
        data,
        new_name=new_name,
        column=column,
        examples=examples,
        batch_size=batch_size,
        max_length=max_length,
        steps=steps,
        lr=lr,
        head=head,  # type: ignore[arg-type]
    )
    click.echo(
        f"calibrated {rec.name!r}: output MSE {losses['loss_before']:.4g} -> "
        f"{losses['loss_after']:.4g}, relative error {rec.rel_error:.3e}"
    )


@store.command("list")
@click.option("--tag", default=None, help="Only vectors with this tag.")
@_root
@_friendly
def list_cmd(tag: str | None, root: Path | None) -> None:
    """One line per stored vector."""
    for r in Store(root).records(tag):
        tags = f" [{', '.join(r.tags)}]" if r.tags else ""
        click.echo(
            f"{r.name}\t{r.codec}\t{r.bits:.2f} bits\t{r.blob_bytes / 1e6:.1f} MB\t"
            f"base {r.base_fingerprint or '?'}{tags}"
        )


def _show_lines(r: VectorRecord, tensors: bool) -> list[str]:
    lines = [
        f"name:        {r.name}",
        f"description: {r.description}",
        f"tags:        {', '.join(r.tags)}",
        f"created:     {r.created}",
        f"base:        {r.base_fingerprint} (header {r.base_header}) from {r.base_path}",
        f"codec:       {r.codec}",
        f"blob:        sha256 {r.blob} ({r.blob_bytes:,} bytes)",
        f"parameters:  {r.params:,} in {len(r.tensors)} tensors, {r.bits:.3f} bits each",
        f"norm:        {r.norm:.6g}   sparsity: {r.sparsity:.4f}   error: {r.rel_error:.3e}",
        f"provenance:  {json.dumps(r.provenance, sort_keys=True)}",
    ]
    if r.residual_of is not None:
        lines.append(f"offset on:   {r.residual_of} (RTVQ: decoded as its vector plus this one)")
    if r.scores:
        lines.append(f"scores:      {json.dumps(r.scores, sort_keys=True)}")
    for kind, digest in r.artefacts.items():
        lines.append(f"artefact:    {kind} (sha256 {digest})")
    if tensors:
        lines += [
            f"  {t.name}  {list(t.shape)}  {t.dtype}  {t.codec}  {t.bits:.3f} bits  "
            f"error {t.rel_error:.3e}  norm {t.norm:.4g}  sparsity {t.sparsity:.3f}"
            for t in r.tensors
        ]
    return lines


@store.command("show")
@click.argument("name")
@click.option("--tensors", is_flag=True, help="List every tensor with its codec and error.")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
@_root
@_friendly
def show_cmd(name: str, tensors: bool, as_json: bool, root: Path | None) -> None:
    """Describe a stored vector."""
    r = Store(root).get(name)
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=1, sort_keys=True))
        return
    for line in _show_lines(r, tensors):
        click.echo(line)


@store.command("artefact")
@click.argument("name")
@click.argument("kind")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="New folder.")
@_root
@_friendly
def artefact_cmd(name: str, kind: str, out: Path, root: Path | None) -> None:
    """Unpack an artefact of a stored vector (KIND: statistics) into a new folder."""
    click.echo(f"unpacked {kind} of {name!r} into {Store(root).extract_artefact(name, kind, out)}")


@store.command("rm")
@click.argument("names", nargs=-1, required=True)
@_root
@_friendly
def rm_cmd(names: tuple[str, ...], root: Path | None) -> None:
    """Forget stored vectors (their blobs go at the next gc)."""
    s = Store(root)
    for name in names:
        s.remove(name)
    click.echo(f"removed {len(names)} vector(s); taskvec store gc frees their blobs")


@store.command("gc")
@_root
@_friendly
def gc_cmd(root: Path | None) -> None:
    """Delete the blobs no vector names."""
    count, freed = Store(root).gc()
    click.echo(f"deleted {count} file(s), {freed / 1e6:.1f} MB")


@store.command("export")
@click.argument("names", nargs=-1, required=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Bundle file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_root
@_friendly
def export_cmd(names: tuple[str, ...], out: Path, overwrite: bool, root: Path | None) -> None:
    """Write stored vectors and their blobs to one bundle file."""
    path = export_bundle(Store(root), list(names), out, overwrite)
    click.echo(f"exported {len(names)} vector(s) to {path} ({path.stat().st_size / 1e6:.1f} MB)")


@store.command("import")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--replace", is_flag=True, help="Replace vectors of the same names.")
@_root
@_friendly
def import_cmd(bundle: Path, replace: bool, root: Path | None) -> None:
    """Add the vectors of a bundle file (every blob's sha256 checked)."""
    names = import_bundle(Store(root, create=True), bundle, replace)
    click.echo(f"imported {', '.join(names)}")


@store.command("equip")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("terms", nargs=-1, required=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--method", default="task_arithmetic", show_default=True, help="A merge method.")
@click.option("--param", "params", multiple=True, help="A method parameter, KEY=VALUE.")
@click.option("--any-base", is_flag=True, help="Skip the base check (task arithmetic only).")
@click.option("--dtype", default=None, help="Output dtype (default: the base's).")
@click.option("--shard-size", default=str(DEFAULT_SHARD_SIZE), show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_root
@_friendly
def equip_cmd(
    base: Path,
    terms: tuple[str, ...],
    out: Path,
    method: str,
    params: tuple[str, ...],
    any_base: bool,
    dtype: str | None,
    shard_size: str,
    threads: int | None,
    overwrite: bool,
    no_progress: bool,
    root: Path | None,
) -> None:
    """Write BASE equipped with stored vectors NAME[:λ]... to OUT (base + Σ λ τ, or --method)."""
    parameters = method_parameters(params)
    equip(
        Store(root),
        base,
        parse_terms(terms),
        out,
        method=method,
        parameters=parameters,
        any_base=any_base,
        dtype=dtype,
        shard_size=shard_size,
        threads=threads,
        overwrite=overwrite,
        progress=not no_progress,
    )
    click.echo(f"equipped {base} with {len(terms)} stored vector(s) into {out}")


@click.command("extract-lora")
@click.argument("tv", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Adapter folder.")
@click.option("--rank", type=click.IntRange(min=1), required=True, help="The largest LoRA rank.")
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True,
              help="Drop singular values at or below this (smaller ranks per module).")  # fmt: skip
@click.option("--embed-lora", is_flag=True, help="Decompose embeddings too (default: whole).")
@click.option("--skip-undecomposable", is_flag=True, help="Leave out norms, biases, embeddings.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The base model (default: the one the task vector records).")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_friendly
def extract_lora_cmd(
    tv: Path,
    out: Path,
    rank: int,
    sv_epsilon: float,
    embed_lora: bool,
    skip_undecomposable: bool,
    base: Path | None,
    overwrite: bool,
) -> None:
    """Write a PEFT LoRA adapter of the task vector TV (SVD per matrix, at most --rank)."""
    from taskvec.algebra import TaskVector, load
    from taskvec.errors import CheckpointError
    from taskvec.extract_lora import extract_lora

    tau = load(tv)
    if not isinstance(tau, TaskVector):
        raise CheckpointError(f"{tv}: is a model, not a task vector (make one with taskvec diff)")
    config = extract_lora(
        tau,
        out,
        rank,
        sv_epsilon=sv_epsilon,
        embed_lora=embed_lora,
        skip_undecomposable=skip_undecomposable,
        base=base,
        overwrite=overwrite,
    )
    click.echo(
        f"wrote a LoRA adapter of {len(config['target_modules'])} modules (rank ≤ {config['r']}) "
        f"and {len(config['modules_to_save'] or [])} whole modules to {out}"
    )
