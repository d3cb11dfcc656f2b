"""The task-vector store: add, list, show, remove and read back task vectors.

A store is a folder (default ``~/.cache/taskvec/store``, or ``$TASKVEC_STORE``) holding
``catalogue.sqlite`` (see :mod:`~taskvec.store.catalogue`), ``blobs/`` (content-addressed
safetensors, see :mod:`~taskvec.store.blobs`) and ``scratch/`` (blobs being written).
``store add`` encodes a task vector tensor by tensor with a codec
(:mod:`~taskvec.store.codecs`), writing the encoded parts to a blob as they come and measuring
each tensor's relative error (from the reconstruction), so memory holds a few tensors whatever
the model's size. Writers hold a shared lock on ``.lock`` from their first blob byte to their
catalogue row; ``gc`` takes it exclusively, so it never deletes a blob about to be named.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from taskvec.algebra import Model, StoredVector, TaskVector, base_mismatch, load, load_model
from taskvec.engine import default_threads, parallel_map
from taskvec.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleError,
    NumericError,
    OutputError,
)
from taskvec.io.dtypes import dtype_name
from taskvec.peft_lora import is_adapter, load_adapter
from taskvec.store import kernels
from taskvec.store.blobs import BlobWriter, blob_path, file_sha256, scratch_name
from taskvec.store.catalogue import Catalogue, NameTaken
from taskvec.store.codecs import MAX_PARTS, Codec, bits_per_parameter, parse_codec
from taskvec.store.records import TensorRecord, VectorRecord, header_hash
from taskvec.store.vector import BlobCheckpoint

STORE_ENV = "TASKVEC_STORE"
# RTVQ's offsets: 2-bit min–max uses all 4 levels (2-bit absmax only 3: −s, 0, s); on the
# benchmark it kept TA and TIES within 0.3 % at 1.52 bits, absmax lost 2.6 % on TIES
RTVQ_OFFSETS = "int2/g128/minmax/zstd"


def store_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$TASKVEC_STORE``, else ``~/.cache/taskvec/store``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "taskvec" / "store"


def _encode(
    codec: Codec, name: str, target: torch.Tensor, whole: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``target`` encoded, its error relative to ``whole`` (τ; ``target`` is τ itself or an
    offset from a shared base), bits and statistics of ``whole``."""
    norm2, nonzero = kernels.moments(kernels.kernel_input(whole))
    if not math.isfinite(norm2):
        raise NumericError(f"tensor {name!r} has NaN or infinite entries: nothing stored")
    parts, err2 = codec.encode_measured(target, name)
    norm = math.sqrt(norm2)
    stats = {
        "bits": bits_per_parameter(parts, whole.numel()),
        "rel_error": math.sqrt(err2) / norm if norm > 0 else math.sqrt(err2),
        "norm": norm,
        "sparsity": (whole.numel() - nonzero) / max(1, whole.numel()),
    }
    return parts, stats


class Store:
    """A task-vector store in the folder ``root`` (see :func:`store_dir`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, create: bool = False) -> None:
        self.root = store_dir(root)
        db = self.root / "catalogue.sqlite"
        if not db.is_file():
            if not create:
                raise CheckpointError(
                    f"{self.root}: no task-vector store here (make one with taskvec store init)"
                )
            self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = self.root / "blobs"
        self.scratch = self.root / "scratch"
        self.catalogue = Catalogue(db)

    # --- locking -------------------------------------------------------------------------
    @contextmanager
    def writing(self, exclusive: bool = False) -> Iterator[None]:
        """Hold the store's lock: shared by writers of blobs and records, exclusive for gc."""
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- queries ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.catalogue.names()

    def get(self, name: str) -> VectorRecord:
        """The record of ``name``; an error naming the store's vectors if there is none."""
        record = self.catalogue.get(name)
        if record is None:
            have = self.names()
            listed = ", ".join(have[:8]) + (" …" if len(have) > 8 else "") if have else "none"
            raise ConfigError(f"no vector {name!r} in the store {self.root} (it holds: {listed})")
        return record

    def records(self, tag: str | None = None) -> list[VectorRecord]:
        out = [r for n in self.names() if (r := self.catalogue.get(n)) is not None]
        return [r for r in out if tag is None or tag in r.tags]

    def checkpoint(self, name: str) -> BlobCheckpoint:
        """The stored vector as a checkpoint that decodes on read (its blob, and those of
        the vectors it is an offset on, checked first)."""
        record = self.get(name)
        shared = record.residual_of
        return BlobCheckpoint(
            record, self.blobs, None if shared is None else self.checkpoint(shared)
        )

    def vector(self, name: str) -> StoredVector:
        """The stored vector as a lazy :class:`~taskvec.algebra.TaskVector`."""
        return StoredVector(self.checkpoint(name))

    # --- changes -------------------------------------------------------------------------
    def add(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        codec: str = "exact",
        description: str = "",
        tags: Iterable[str] = (),
        licence: str | None = None,
        parents: Iterable[str] = (),
        statistics: str | os.PathLike[str] | None = None,
        scores: dict[str, float] | None = None,
        replace: bool = False,
        threads: int | None = None,
    ) -> VectorRecord:
        """Encode the task vector ``source`` (a saved task vector; a fine-tuned model or a PEFT
        LoRA adapter with ``base``) with ``codec`` and record it as ``name``."""
        self.check_name(name, replace)
        for parent in parents:
            self.get(parent)
        the_codec = parse_codec(codec)
        tau, base_model = _source_vector(source, base)
        stats_dir = Path(statistics).expanduser() if statistics is not None else None
        if stats_dir is not None and not stats_dir.is_dir():
            raise CheckpointError(f"{stats_dir}: no such statistics folder")
        about = {
            "description": description,
            "tags": sorted(set(tags)),
            "scores": dict(scores or {}),
            "provenance": _provenance(source, tau, list(parents), licence),
        }
        with self.writing():
            if stats_dir is not None:
                about["artefacts"] = {"statistics": self._write_folder(stats_dir)}
            return self._record(name, tau, base_model, the_codec, about, replace, threads)

    def add_rtvq(
        self,
        shared: str,
        members: Mapping[str, str | os.PathLike[str]],
        *,
        base: str | os.PathLike[str] | None = None,
        shared_codec: str = "int3",
        codec: str = RTVQ_OFFSETS,
        licence: str | None = None,
        replace: bool = False,
        threads: int | None = None,
    ) -> list[VectorRecord]:
        """RTVQ (Kim et al., arXiv 2503.06921): the members' average τ̄ stored as ``shared``
        with ``shared_codec``, each member as the offset τ_t − decode(τ̄) with ``codec``;
        a member decodes as decode(τ̄) + decode(offset). The relative error recorded for a
        member's tensor is that of the sum, over ‖τ_t‖."""
        for name in (shared, *members):
            self.check_name(name, replace)
        if len(members) < 2:
            raise ConfigError("RTVQ shares a base between at least two task vectors")
        shared_spec, member_spec = parse_codec(shared_codec), parse_codec(codec)
        loaded = {n: _source_vector(src, base) for n, src in members.items()}
        taus = [tau for tau, _ in loaded.values()]
        fingerprints = {r.fingerprint if (r := t._base_record()) else None for t in taus}
        if len(fingerprints) != 1:
            raise IncompatibleError(f"RTVQ members come from different bases: {fingerprints}")
        base_model = next(iter(loaded.values()))[1]
        out = []
        with self.writing():
            mean = sum(taus[1:], taus[0]) / len(taus)
            about = {
                "description": f"RTVQ shared base of {', '.join(members)}",
                "tags": ["rtvq-base"],
                "provenance": _provenance(None, mean, [], licence),
            }
            out.append(self._record(shared, mean, base_model, shared_spec, about, replace, threads))
            decoded = self.vector(shared)
            for name, (tau, _) in loaded.items():
                about = {
                    "tags": ["rtvq"],
                    "residual_of": shared,
                    "provenance": _provenance(members[name], tau, [shared], licence),
                }
                rec = self._record(
                    name, tau, base_model, member_spec, about, replace, threads, decoded
                )
                out.append(rec)
        return out

    def check_name(self, name: str, replace: bool) -> None:
        """Refuse a malformed name, or one already taken (unless ``replace``)."""
        if not name or "/" in name or ":" in name or name.strip() != name:
            raise ConfigError(f"bad vector name {name!r} (no '/', ':' or outer spaces)")
        if not replace and self.catalogue.get(name) is not None:
            raise NameTaken(f"the store already holds a vector named {name!r}")

    def _record(
        self,
        name: str,
        tau: TaskVector,
        base_model: Model | None,
        codec: Codec,
        about: dict[str, Any],
        replace: bool,
        threads: int | None,
        residual: TaskVector | None = None,
    ) -> VectorRecord:
        """Encode ``tau`` (minus ``residual``) into a blob and record it as ``name``."""
        tensors, (digest, checksum, size) = self._write_blob(tau, codec, threads, residual)
        base = tau._base_record()
        rec = VectorRecord(
            name=name,
            blob=digest,
            codec=codec.spec if residual is None else f"rtvq:{about['residual_of']}+{codec.spec}",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            base_fingerprint=None if base is None else base.fingerprint,
            base_header=None if base_model is None else header_hash(base_model.primary),
            base_path=None if base is None else _absolute(base.path),
            tensors=tensors,
            blob_bytes=size,
            blob_checksum=checksum,
            **about,
        )
        self.catalogue.insert(rec, replace=replace)
        return rec

    def write_blob(
        self, names: list[str], parts: Iterable[tuple[str, Mapping[str, torch.Tensor]]]
    ) -> tuple[str, str, int]:
        """A blob of the encoded tensors ``names`` whose parts ``parts`` yields, written as
        they come: its sha256, xxh3-128 checksum and size. Call it holding :meth:`writing`."""
        meta = {"taskvec.kind": "store_blob"}
        writer = BlobWriter(self.blobs, self.scratch, meta, names, MAX_PARTS)
        try:
            for name, tensor_parts in parts:
                for key, value in tensor_parts.items():
                    writer.add(f"{name}::{key}", value)
        except BaseException:
            writer.abort()
            raise
        return writer.finish()

    def _write_blob(
        self, tau: TaskVector, codec: Codec, threads: int | None, residual: TaskVector | None
    ) -> tuple[list[TensorRecord], tuple[str, str, int]]:
        specs = tau.specs
        tensors: list[TensorRecord] = []

        def encode(name: str) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
            whole = _native(tau, name)
            target = whole if residual is None else whole.float() - residual.tensor(name)
            parts, stats = _encode(codec, name, target, whole)
            return name, parts, stats

        def encoded() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
            workers = threads or default_threads()
            for name, parts, stats in parallel_map(encode, list(specs), workers, 4 * workers):
                spec = specs[name]
                shape, dtype = tuple(spec.shape), dtype_name(spec.dtype)
                tensors.append(TensorRecord(name, shape, dtype, codec.spec, tuple(parts), **stats))
                yield name, parts

        written = self.write_blob(list(specs), encoded())
        return tensors, written

    def _write_folder(self, folder: Path) -> str:
        """A folder (statistics) stored as a tar blob; its sha256."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = scratch_name(self.scratch, ".tar")
        try:
            with tarfile.open(tmp, "w") as tar:
                for path in sorted(folder.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
            digest = file_sha256(tmp)
            final = blob_path(self.blobs, digest, ".tar")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def extract_artefact(self, name: str, kind: str, out: str | os.PathLike[str]) -> Path:
        """Unpack the artefact ``kind`` (``statistics``) of ``name`` into the new folder
        ``out``, its blob's sha256 checked first."""
        record = self.get(name)
        if kind not in record.artefacts:
            have = ", ".join(record.artefacts) or "none"
            raise ConfigError(f"{name!r} has no {kind!r} artefact (it has: {have})")
        digest = record.artefacts[kind]
        path = blob_path(self.blobs, digest, ".tar")
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"{name!r}: artefact blob {path} is missing or corrupt")
        target = Path(out).expanduser()
        if target.exists():
            raise OutputError(f"{target}: exists; choose a new folder")
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        os.rename(tmp, target)
        return target

    def remove(self, name: str) -> None:
        """Forget ``name`` (its blob stays until :meth:`gc`); refused while other vectors
        are offsets on it."""
        self.get(name)
        users = [r.name for r in self.records() if r.residual_of == name]
        if users:
            raise ConfigError(
                f"{name!r} is the shared base of {', '.join(users)}: remove them first"
            )
        self.catalogue.delete(name)

    def gc(self) -> tuple[int, int]:
        """Delete the blobs no record names and the scratch files of writers that died:
        (files, bytes) freed. Writers hold the lock shared, so none is writing meanwhile."""
        freed = count = 0
        with self.writing(exclusive=True):
            used = self.catalogue.blobs_in_use()
            blobs = [p for p in self.blobs.glob("*/*") if p.name.split(".")[0] not in used]
            scratch = list(self.scratch.glob("*")) if self.scratch.is_dir() else []
            for path in [*blobs, *scratch]:
                freed += path.stat().st_size
                count += 1
                path.unlink()
        return count, freed


def _absolute(path: str) -> str:
    """A recorded base path, made absolute when it names something here."""
    return str(Path(path).absolute()) if Path(path).exists() else path


def _native(tau: TaskVector, name: str) -> torch.Tensor:
    """One tensor of ``tau`` in its stored dtype (read as is from a task vector on disk)."""
    if isinstance(tau, StoredVector):
        return tau.ckpt.read(name)
    return tau.tensor(name).to(tau.specs[name].dtype)


def _source_vector(
    source: str | os.PathLike[str], base: str | os.PathLike[str] | None
) -> tuple[TaskVector, Model | None]:
    """The task vector ``source`` stands for, and the base model when given."""
    base_model = load_model(base) if base is not None else None
    if is_adapter(source):
        if base_model is None:
            raise ConfigError(f"{source}: a LoRA adapter needs --base (the model it adapts)")
        return load_adapter(source, base_model), base_model
    loaded = load(source)
    if isinstance(loaded, Model):
        if base_model is None:
            raise ConfigError(
                f"{source}: a model, not a task vector: give --base to store FT − BASE"
            )
        return loaded - base_model, base_model
    if base_model is not None and (problem := base_mismatch(base_model, loaded)) is not None:
        raise IncompatibleError(problem)
    return loaded, base_model


def _provenance(
    source: str | os.PathLike[str] | None, tau: TaskVector, parents: list[str], licence: str | None
) -> dict[str, Any]:
    return {
        "source": None if source is None else str(Path(source).expanduser().absolute()),
        "config": _source_config(tau),
        "parents": parents,
        "licence": licence,
        "taskvec_version": version("taskvec"),
        "torch_version": torch.__version__,
    }


def _source_config(tau: TaskVector) -> dict[str, Any] | None:
    """The recipe a saved task vector records in its manifest, if any."""
    if not isinstance(tau, StoredVector):
        return None
    try:
        manifest = json.loads((tau.ckpt.root / "taskvec-manifest.json").read_text())
    except (OSError, ValueError):
        return None
    producer = manifest.get("producer") if isinstance(manifest, dict) else None
    return producer if isinstance(producer, dict) else None
