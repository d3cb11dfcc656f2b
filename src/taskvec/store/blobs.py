"""Content-addressed blobs of a store: safetensors files named by their sha256.

A blob is written tensor by tensor into a scratch file (:class:`BlobWriter`: the header last,
into room reserved for it), fsynced, hashed and renamed to
``blobs/<2 hex>/<sha256>.safetensors``: a blob is whole or absent, and two writers of the same
content write the same name. Every read checks the sha256 first (:func:`verified_blob`): a
corrupt blob is named in the error and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from taskvec.errors import CheckpointError
from taskvec.io.checkpoint import SafetensorsFile
from taskvec.io.dtypes import CODE_OF_DTYPE
from taskvec.io.durable import fsync_path

_COPY = 8 << 20


def blob_path(blobs: Path, digest: str, suffix: str = ".safetensors") -> Path:
    return blobs / digest[:2] / f"{digest}{suffix}"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY):
            h.update(chunk)
    return h.hexdigest()


def scratch_name(folder: Path, suffix: str) -> Path:
    """A fresh name in ``folder`` that no concurrent writer uses."""
    return folder / f"{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def install(
    blobs: Path, scratch: Path, sources: Iterable[BinaryIO], suffix: str
) -> tuple[str, int]:
    """Copy ``sources`` one after the other into a scratch file while hashing them, fsync it
    and rename it to its blob name: (sha256, size). The same content gets the same name, so
    a concurrent writer of it replaces it with identical bytes."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch_name(scratch, suffix)
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for src in sources:
                while chunk := src.read(_COPY):
                    h.update(chunk)
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
    return h.hexdigest(), size


_PART_BOUND = 200  # JSON bytes of one header entry, beyond its name (dtype, shape, offsets)


class BlobWriter:
    """Collect named tensors into one blob; :meth:`finish` gives its sha256.

    The header's room is reserved up front from the tensor names (``names``, at most
    ``parts`` parts each, named ``name::part``), so the tensors' bytes are written once, in
    place; the header is written last, padded with spaces as the safetensors format allows.
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
        self._file = open(self._path, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._file.seek(8 + self._room)
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        if size:
            self._file.write(t.reshape(-1).view(torch.uint8).numpy())
        self._header[name] = {
            "dtype": CODE_OF_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size

    def finish(self) -> tuple[str, int]:
        """Write the header, then move the blob into place; its sha256 and size."""
        try:
            header = json.dumps(self._header, separators=(",", ":")).encode()
            if len(header) > self._room:
                raise RuntimeError("blob header larger than the room reserved for it")
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._room) + header.ljust(self._room))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            digest = file_sha256(self._path)
            final = blob_path(self.blobs, digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, final)  # the same content under the same name: harmless
            fsync_path(final.parent)
            return digest, final.stat().st_size
        finally:
            self.abort()

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


def verified_blob(blobs: Path, digest: str, what: str) -> SafetensorsFile:
    """The blob ``digest`` opened for reading after checking its sha256 (``what`` names it in
    errors)."""
    path = blob_path(blobs, digest)
    if not path.is_file():
        raise CheckpointError(f"{what}: blob {path} is missing from the store")
    actual = file_sha256(path)
    if actual != digest:
        raise CheckpointError(
            f"{what}: blob {path} is corrupt (sha256 {actual[:16]}…, expected {digest[:16]}…); "
            "it is not used"
        )
    return SafetensorsFile(path)
