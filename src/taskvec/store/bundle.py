"""Moving stored vectors between machines: one bundle file (an uncompressed tar).

A bundle holds ``records.json`` (the records, as :meth:`VectorRecord.to_json`) and the blobs
they name (``blobs/<sha256>.safetensors`` or ``.tar``). Export checks every blob before
packing it; import checks every blob's sha256 while copying it into the store and refuses the
bundle, leaving the catalogue as it was, if one differs or a record's blob is missing.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from taskvec.errors import CheckpointError, OutputError
from taskvec.io.durable import fsync_path
from taskvec.store.blobs import blob_path, file_sha256, install, scratch_name
from taskvec.store.records import VectorRecord
from taskvec.store.store import Store

_RECORDS = "records.json"
_SUFFIXES = (".safetensors", ".tar")


def _blob_files(store: Store, record: VectorRecord) -> list[Path]:
    digests = [(record.blob, ".safetensors")] + [(d, ".tar") for d in record.artefacts.values()]
    out = []
    for digest, suffix in digests:
        path = blob_path(store.blobs, digest, suffix)
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(
                f"stored vector {record.name!r}: blob {path} is missing or corrupt"
            )
        out.append(path)
    return out


def _with_shared(store: Store, names: list[str]) -> list[VectorRecord]:
    """The records of ``names`` and of the vectors they are offsets on, those first."""
    out: dict[str, VectorRecord] = {}

    def visit(name: str) -> None:
        record = store.get(name)
        if record.residual_of is not None:
            visit(record.residual_of)
        out.setdefault(name, record)

    for name in names:
        visit(name)
    return list(out.values())


def export_bundle(store: Store, names: list[str], out: Path, overwrite: bool = False) -> Path:
    """Write the vectors ``names`` (and the shared bases they are offsets on) with their
    blobs to the bundle file ``out``."""
    out = out.expanduser().absolute()
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists (use --overwrite to replace it)")
    records = _with_shared(store, names)
    blobs = {p.name: p for r in records for p in _blob_files(store, r)}
    tmp = scratch_name(out.parent, ".bundle.tmp")
    try:
        with tarfile.open(tmp, "w") as tar:
            data = json.dumps([r.to_json() for r in records], indent=1).encode()
            info = tarfile.TarInfo(_RECORDS)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for name, path in blobs.items():
                tar.add(path, arcname=f"blobs/{name}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_path(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def import_bundle(store: Store, bundle: Path, replace: bool = False) -> list[str]:
    """Add the vectors of ``bundle`` to ``store``; their names."""
    bundle = bundle.expanduser()
    try:
        tar = tarfile.open(bundle, "r:")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as e:
        raise CheckpointError(f"{bundle}: not a taskvec store bundle ({e})") from None
    with tar:
        try:
            member = tar.extractfile(_RECORDS)
            assert member is not None
            records = [VectorRecord.from_json(r) for r in json.loads(member.read())]
        except (KeyError, AssertionError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{bundle}: not a taskvec store bundle (no records: {e})"
            ) from None
        taken = [r.name for r in records if store.catalogue.get(r.name) is not None]
        if taken and not replace:
            raise CheckpointError(
                f"{bundle}: the store already holds {', '.join(map(repr, taken))} (use --replace)"
            )
        wanted = {r.blob for r in records} | {d for r in records for d in r.artefacts.values()}
        found: dict[str, str] = {}  # sha256 -> checksum taken here (a bundle's is not trusted)
        store.scratch.mkdir(parents=True, exist_ok=True)
        with store.writing():
            for m in tar.getmembers():
                stem, suffix = Path(m.name).stem, Path(m.name).suffix
                if not m.name.startswith("blobs/") or suffix not in _SUFFIXES or stem not in wanted:
                    continue
                found[stem] = _copy_blob(store, tar, m, stem, suffix, bundle)
            if missing := wanted - set(found):
                raise CheckpointError(f"{bundle}: lacks blob {sorted(missing)[0]}")
            for r in records:
                r.blob_checksum = found[r.blob]
                store.catalogue.insert(r, replace=replace)
    return [r.name for r in records]


def _copy_blob(
    store: Store, tar: tarfile.TarFile, m: tarfile.TarInfo, digest: str, suffix: str, bundle: Path
) -> str:
    """Install the bundle's blob ``m`` after checking its sha256; its checksum."""
    src = tar.extractfile(m)
    if src is None:
        raise CheckpointError(f"{bundle}: {m.name} is not a file")
    got, checksum, _ = install(store.blobs, store.scratch, [src], suffix)
    if got != digest:
        raise CheckpointError(f"{bundle}: blob {m.name} is corrupt (its sha256 is {got[:16]}…)")
    return checksum
