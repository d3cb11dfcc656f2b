"""Content fingerprints of checkpoints: which exact weights a task vector or a merge came from.

A fingerprint hashes every tensor's name, shape, dtype and bytes, so two checkpoints of one
architecture with different weights never share one (a fingerprint of names and shapes alone
would). Each tensor's bytes are hashed with xxh3-128 (about 20 GB/s, far above disk speed),
streamed in pieces of at most :data:`PIECE_BYTES`, so memory stays bounded whatever the size.

Per-tensor digests are cached per weight file under ``<cache>/fingerprints`` (see
:func:`taskvec.cache.cache_dir`), keyed by the file's absolute path, size and modification
time: a file is hashed once until it changes. A cache that cannot be read or written is
ignored (the digests are then recomputed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import xxhash

from taskvec.cache import cache_dir
from taskvec.io.checkpoint import Checkpoint
from taskvec.io.dtypes import dtype_name

log = logging.getLogger("taskvec")

SCHEME = "c1"  # the prefix of every content fingerprint; bump when the hashing changes
PIECE_BYTES = 16 << 20


def tensor_bytes_digest(pieces: Iterable[torch.Tensor]) -> str:
    """xxh3-128 of the raw bytes of ``pieces`` (tensors, in order), as hex."""
    h = xxhash.xxh3_128()
    for piece in pieces:
        if piece.numel():
            h.update(memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def row_pieces(ckpt: Checkpoint, name: str) -> Iterable[torch.Tensor]:
    """The tensor ``name`` of ``ckpt`` as stored, in row blocks of at most ``PIECE_BYTES``."""
    info = ckpt.tensors[name]
    if len(info.shape) < 2 or info.nbytes <= PIECE_BYTES:
        yield ckpt.read(name)
        return
    rows = info.shape[0]
    step = max(1, PIECE_BYTES // max(1, info.nbytes // rows))
    for start in range(0, rows, step):
        yield ckpt.read(name, (start, min(start + step, rows)))


def _cache_file(weights: Path) -> Path:
    key = xxhash.xxh3_64(str(weights.resolve()).encode()).hexdigest()
    return cache_dir() / "fingerprints" / f"{key}.json"


def _load_cache(weights: Path, stamp: list[int]) -> dict[str, str]:
    try:
        data = json.loads(_cache_file(weights).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("stamp") != stamp or data.get("scheme") != SCHEME:
        return {}
    digests = data.get("digests")
    return digests if isinstance(digests, dict) else {}


def _store_cache(weights: Path, stamp: list[int], digests: dict[str, str]) -> None:
    path = _cache_file(weights)
    record = {"scheme": SCHEME, "path": str(weights.resolve()), "stamp": stamp, "digests": digests}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("fingerprint cache not written (%s)", e)


def tensor_digests(ckpt: Checkpoint) -> dict[str, str]:
    """Every tensor's byte digest (see :func:`tensor_bytes_digest`), using the cache."""
    if ckpt.derived:  # its reads are not its files' bytes: caching them would poison the cache
        raise TypeError(f"{ckpt!r} computes its tensors: fingerprint the checkpoints it reads")
    by_file: dict[Path, list[str]] = {}
    for name, info in ckpt.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    out: dict[str, str] = {}
    for weights, names in by_file.items():
        st = weights.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        cached = _load_cache(weights, stamp)
        missing = [n for n in names if n not in cached]
        for n in missing:
            cached[n] = tensor_bytes_digest(row_pieces(ckpt, n))
        if missing:
            log.info("hashed %d tensor(s) of %s", len(missing), weights)
            _store_cache(weights, stamp, cached)
        out.update({n: cached[n] for n in names})
    return out


def content_fingerprint(ckpt: Checkpoint, names: Iterable[str] | None = None) -> str:
    """``c1:`` and 32 hex digits over the name, shape, dtype and bytes of every tensor of
    ``ckpt`` (or of ``names`` only), in name order."""
    digests = tensor_digests(ckpt)
    chosen = sorted(ckpt.tensors if names is None else names)
    h = xxhash.xxh3_128()
    for name in chosen:
        info = ckpt.tensors[name]
        h.update(f"{name}|{list(info.shape)}|{dtype_name(info.dtype)}|{digests[name]};".encode())
    return f"{SCHEME}:{h.hexdigest()}"
