"""Content-addressed blobs of a store: safetensors files named by their sha256.

A blob is written tensor by tensor into a scratch file (:class:`BlobWriter`: the header last,
into room reserved for it), fsynced, hashed and renamed to
``blobs/<2 hex>/<sha256>.safetensors``: a blob is whole or absent, and two writers of the same
content write the same name. Every read checks the blob first (:func:`verified_blob`) against
its xxh3-128 checksum, taken with the sha256 when the blob was written here (about 15× faster
to check: sha256 cost equipping three int4 vectors of a 1.1B model a second), or against
its sha256 where the record has no checksum: a corrupt blob is named in the error and never
used. Blobs from elsewhere (bundles) are checked by sha256 and get their checksum here.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from taskvec.errors import CheckpointError
from taskvec.io.background_writes import Write, WriteQueue
from taskvec.io.checkpoint import SafetensorsFile
from taskvec.io.dtypes import CODE_OF_DTYPE
from taskvec.io.durable import fsync_path

_COPY = 8 << 20
_QUEUED = 64 << 20  # bytes of encoded tensors that may wait for the writing thread


def blob_path(blobs: Path, digest: str, suffix: str = ".safetensors") -> Path:
    return blobs / digest[:2] / f"{digest}{suffix}"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, streamed."""
    return _file_digests(path, hashlib.sha256())[0]


def file_checksum(path: Path) -> str:
    """The xxh3-128 checksum of a file's bytes (hex), streamed."""
    return _file_digests(path, xxhash.xxh3_128())[0]


def _file_digests(path: Path, *hashers: Any) -> list[str]:
    with open(path, "rb") as f:
        while chunk := f.read(_COPY):
            for h in hashers:
                h.update(chunk)
    return [h.hexdigest() for h in hashers]


def scratch_name(folder: Path, suffix: str) -> Path:
    """A fresh name in ``folder`` that no concurrent writer uses."""
    return folder / f"{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def install(
    blobs: Path, scratch: Path, sources: Iterable[BinaryIO], suffix: str
) -> tuple[str, str, int]:
    """Copy ``sources`` one after the other into a scratch file while hashing them, fsync it
    and rename it to its blob name: (sha256, xxh3-128 checksum, size). The same content gets
    the same name, so a concurrent writer of it replaces it with identical bytes."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch_name(scratch, suffix)
    h, check = hashlib.sha256(), xxhash.xxh3_128()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for src in sources:
                while chunk := src.read(_COPY):
                    h.update(chunk)
                    check.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        final = blob_path(blobs, h.hexdigest(), suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest(), check.hexdigest(), size


_PART_BOUND = 200  # JSON bytes of one header entry, beyond its name (dtype, shape, offsets)


class BlobWriter:
    """Collect named tensors into one blob; :meth:`finish` gives its sha256.

    The header's room is reserved up front from the tensor names (``names``, at most
    ``parts`` parts each, named ``name::part``), so the tensors' bytes are written once, in
    place, by a background thread that also starts their disk writes (see
    :mod:`taskvec.io.background_writes`): the caller goes on encoding meanwhile. The header is
    written last, padded with spaces as the safetensors format allows.
    """

    def __init__(
        self, blobs: Path, scratch: Path, metadata: dict[str, str], names: Iterable[str], parts: int
    ) -> None:
        self.blobs, self.scratch = blobs, scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self._path = scratch_name(scratch, ".blob")
        self._header: dict[str, object] = {"__metadata__": metadata}
        meta = len(json.dumps(self._header))
        room = meta + sum(parts * (len(json.dumps(n)) + _PART_BOUND) for n in names)
        self._room = room + (-room % 8)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._queue = WriteQueue(_QUEUED)
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor``'s bytes (it must not change afterwards)."""
        t = tensor.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        if size:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            self._queue.put(Write(self._fd, 8 + self._room + self._offset, view, t))
        self._header[name] = {
            "dtype": CODE_OF_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size

    def finish(self) -> tuple[str, str, int]:
        """Write the header, then move the blob into place: its sha256, xxh3-128 checksum and
        size. The file is hashed (from the page cache) while ``fsync`` waits for the disk."""
        try:
            self._queue.drain()
            header = json.dumps(self._header, separators=(",", ":")).encode()
            if len(header) > self._room:
                raise RuntimeError("blob header larger than the room reserved for it")
            os.pwrite(self._fd, struct.pack("<Q", self._room) + header.ljust(self._room), 0)
            with ThreadPoolExecutor(1) as pool:
                synced = pool.submit(os.fsync, self._fd)
                digest, check = _file_digests(self._path, hashlib.sha256(), xxhash.xxh3_128())
                synced.result()
            final = blob_path(self.blobs, digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, final)  # the same content under the same name: harmless
            fsync_path(final.parent)
            return digest, check, final.stat().st_size
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop writing and drop the scratch file (a no-op after :meth:`finish`)."""
        self._queue.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._path.unlink(missing_ok=True)


def verified_blob(blobs: Path, digest: str, what: str, checksum: str | None) -> SafetensorsFile:
    """The blob ``digest`` opened for reading after checking its xxh3-128 ``checksum`` (its
    sha256 when None); ``what`` names it in errors."""
    path = blob_path(blobs, digest)
    if not path.is_file():
        raise CheckpointError(f"{what}: blob {path} is missing from the store")
    if checksum is not None:
        actual, want, kind = file_checksum(path), checksum, "xxh3-128"
    else:
        actual, want, kind = file_sha256(path), digest, "sha256"
    if actual != want:
        raise CheckpointError(
            f"{what}: blob {path} is corrupt ({kind} {actual[:16]}…, expected {want[:16]}…); "
            "it is not used"
        )
    return SafetensorsFile(path)
