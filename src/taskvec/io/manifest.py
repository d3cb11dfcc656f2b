"""The manifest of an output, ``taskvec-manifest.json``, and checking an output against it.

Every output gets one, written last before the output is committed, so a folder without it
is not a complete taskvec output. It says what produced the output (the caller's description:
for a merge the resolved config, method, seed and device; the content fingerprints of the
inputs), the safetensors metadata, which tensor is in which shard with which dtype and shape,
a checksum of every tensor and one of every other file.

A tensor's checksum is the list of its row pieces as the writer wrote them,
``[start, stop, xxh3-128 of the rows' bytes]`` in row order (one row for a 0-d tensor): the
pieces are hashed while their bytes are in hand, whatever order and thread they are written
in, and :func:`verify` rereads the same rows. The pieces of a merge do not depend on the
thread count, so the same merge always writes the same manifest (it holds no time stamps).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

import taskvec
from taskvec.errors import CheckpointError, OutputError, TaskvecError
from taskvec.io.checkpoint import Checkpoint, SafetensorsFile, open_checkpoint
from taskvec.io.dtypes import CODE_OF_DTYPE
from taskvec.io.fingerprint import content_fingerprint, tensor_bytes_digest

MANIFEST = "taskvec-manifest.json"
_FORMAT = 1
_READ_BYTES = 64 << 20  # rows reread per step when checking a large piece


def manifest_head(
    producer: dict[str, Any], metadata: dict[str, str], shards: Sequence[tuple[str, Sequence[Any]]]
) -> dict[str, Any]:
    """Everything the manifest says before any tensor is written: ``shards`` lists
    ``(file name, planned tensors)``."""
    return {
        "taskvec_manifest": _FORMAT,
        "taskvec_version": taskvec.__version__,
        "producer": producer,
        "metadata": metadata,
        "tensors": {
            t.name: {"shard": fn, "dtype": CODE_OF_DTYPE[t.dtype], "shape": list(t.shape)}
            for fn, tensors in shards
            for t in tensors
        },
    }


def identity(head: dict[str, Any]) -> str:
    """A digest of what a manifest head describes (of a full manifest's head part too)."""
    tensors = {n: {k: v for k, v in t.items() if k != "pieces"} for n, t in head["tensors"].items()}
    core = {k: v for k, v in head.items() if k not in ("tensors", "files")} | {"tensors": tensors}
    return xxhash.xxh3_128(json.dumps(core, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe_inputs(inputs: Sequence[Checkpoint], threads: int = 1) -> list[dict[str, Any]]:
    """Each input's path and content fingerprint (none for a computed view), hashed on up to
    ``threads`` threads (once per file: the digests are cached)."""

    def one(ckpt: Checkpoint) -> dict[str, Any]:
        fp = None if ckpt.derived else content_fingerprint(ckpt)
        return {"path": str(Path(ckpt.path).absolute()), "fingerprint": fp}

    with ThreadPoolExecutor(max(1, min(threads, len(inputs)))) as pool:
        return list(pool.map(one, inputs))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``; None if it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("taskvec_manifest") == _FORMAT else None


def verify(folder: Path, inputs: bool = False) -> tuple[list[str], int]:
    """Recompute every checksum of the output ``folder``: the problems found (one line per
    bad tensor or file) and the number of tensors checked. With ``inputs``, also whether each
    input still has the content fingerprint it had."""
    if not folder.is_dir():
        raise OutputError(f"{folder}: no such folder")
    manifest = read_manifest(folder)
    if manifest is None:
        raise OutputError(f"{folder}: no manifest: not a complete taskvec output")
    problems: list[str] = []
    tensors: dict[str, dict[str, Any]] = manifest["tensors"]
    files: dict[str, SafetensorsFile] = {}
    for shard in sorted({t["shard"] for t in tensors.values()}):
        try:
            files[shard] = SafetensorsFile(folder / shard)
        except CheckpointError as e:
            problems.append(f"shard {shard}: {e}")
            continue
        if files[shard].metadata() != manifest["metadata"]:
            problems.append(f"shard {shard}: header metadata differs from the manifest")
        extra = sorted(set(files[shard].infos()) - set(tensors))
        problems += [f"tensor {n!r}: in {shard} but not in the manifest" for n in extra]
    for name, want in tensors.items():
        f = files.get(want["shard"])
        if f is None:
            continue
        problems += _check_tensor(f, name, want)
    listed = {t["shard"] for t in tensors.values()}
    unlisted = sorted({p.name for p in folder.glob("*.safetensors")} - listed)
    problems += [f"file {n}: a weight file the manifest does not list" for n in unlisted]
    for rel, digest in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"file {rel}: missing")
        elif file_digest(path) != digest:
            problems.append(f"file {rel}: contents differ from the manifest")
    if inputs:
        problems += _check_inputs(manifest["producer"].get("inputs") or [])
    return problems, len(tensors)


def _check_tensor(f: SafetensorsFile, name: str, want: dict[str, Any]) -> list[str]:
    info = f.infos().get(name)
    if info is None:
        return [f"tensor {name!r}: missing from {want['shard']}"]
    have = (CODE_OF_DTYPE[info.dtype], list(info.shape))
    if have != (want["dtype"], want["shape"]):
        return [
            f"tensor {name!r}: header says {have[0]} {have[1]}, "
            f"manifest says {want['dtype']} {want['shape']}"
        ]
    rows = info.shape[0] if info.shape else 1
    pieces = want.get("pieces", [])
    if not _tiles(pieces, rows):
        return [f"tensor {name!r}: the manifest's pieces do not cover its {rows} row(s)"]
    bad = [f"{a}..{b}" for a, b, digest in pieces if _rows_digest(f, name, a, b) != digest]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return [f"tensor {name!r}: checksum differs (rows {shown})"]
    return []


def _tiles(pieces: list[list[Any]], rows: int) -> bool:
    """Whether the pieces' row ranges follow each other from row 0 to ``rows``."""
    end = 0
    for start, stop, _ in pieces:
        if start != end or stop <= start:
            return False
        end = stop
    return end == rows


def _rows_digest(f: SafetensorsFile, name: str, start: int, stop: int) -> str:
    """The digest of rows ``[start, stop)`` as stored, read a bounded amount at a time."""
    info = f.infos()[name]
    if not info.shape:
        return tensor_bytes_digest([f.read(name)])
    step = max(1, _READ_BYTES // max(1, info.nbytes // max(1, info.shape[0])))
    return tensor_bytes_digest(
        f.read(name, (r, min(r + step, stop))) for r in range(start, stop, step)
    )


def _check_inputs(inputs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for entry in inputs:
        if entry.get("fingerprint") is None:
            continue
        try:
            now = content_fingerprint(open_checkpoint(entry["path"]))
        except TaskvecError as e:
            problems.append(f"input {entry['path']}: cannot be checked ({e})")
            continue
        if now != entry["fingerprint"]:
            problems.append(f"input {entry['path']}: its weights changed since this output")
    return problems
