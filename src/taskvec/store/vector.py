"""A stored vector read back: its blob as a :class:`Checkpoint` that decodes on read.

:class:`BlobCheckpoint` checks the blob's sha256 when opened, then decodes one tensor (or one
row range of it) per read with the tensor's codec, so a stored vector is a lazy
:class:`~taskvec.algebra.StoredVector`: ``base + 0.5 * store.vector("math")`` streams, and the
merge machinery takes it as it takes a task vector saved on disk (``base + τ``, see
:mod:`taskvec.model_view`). Reads return float32 (the decoded values, not rounded back to the
stored dtype). The checkpoint carries the record's base fingerprint, so applying it to another
base is refused as for any saved task vector.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from taskvec.algebra import TASK_VECTOR_KIND
from taskvec.errors import CheckpointError
from taskvec.io.checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from taskvec.io.dtypes import parse_dtype
from taskvec.store.blobs import verified_blob
from taskvec.store.codecs import Dare, StoredParts, parse_codec
from taskvec.store.records import VectorRecord

STORE_PREFIX = "store:"


class _BlobParts(StoredParts):
    """The parts of one tensor in a blob, read when (and as far as) decoding asks."""

    def __init__(self, blob: SafetensorsFile, name: str, keys: tuple[str, ...]) -> None:
        self.blob, self.name, self.keys = blob, name, keys

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.blob.read(f"{self.name}::{key}")

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.blob.read(f"{self.name}::{key}", (start, stop))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class BlobCheckpoint(Checkpoint):
    """The stored vector ``record`` (blob in ``blobs``) read as a task-vector checkpoint."""

    derived = True  # its reads are decoded, not its file's bytes

    def __init__(  # no super().__init__: no file of weights
        self, record: VectorRecord, blobs: Path, shared: BlobCheckpoint | None = None
    ) -> None:
        self.record = record
        self.shared = shared  # the vector this one is an offset on (RTVQ), decoded and added
        self.path = Path(f"{STORE_PREFIX}{record.name}")
        what = f"stored vector {record.name!r}"
        self._blob = verified_blob(blobs, record.blob, what, record.blob_checksum)
        self.root = self._blob.path.parent
        self._files = []
        self._by_name = {}
        self._tensors = {t.name: t for t in record.tensors}
        self._codecs = {spec: parse_codec(spec) for spec in {t.codec for t in record.tensors}}
        self._infos = {
            t.name: TensorInfo(t.name, t.shape, parse_dtype(t.dtype) or torch.float32, self.path)
            for t in record.tensors
        }
        self._whole: tuple[str, torch.Tensor] | None = None  # a DARE tensor, decoded once
        self._lock = threading.Lock()

    @property
    def files(self) -> list[Path]:
        return [self._blob.path, *(self.shared.files if self.shared is not None else [])]

    @property
    def metadata(self) -> dict[str, str]:
        meta = {"taskvec.kind": TASK_VECTOR_KIND}
        if self.record.base_fingerprint is not None:
            meta["taskvec.base_fingerprint"] = self.record.base_fingerprint
            meta["taskvec.base_path"] = self.record.base_path or "an unrecorded base"
        return meta

    def side_files(self) -> dict[str, Path]:
        return {}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        own = self._read_own(name, rows)
        if self.shared is not None and name in self.shared:
            return own + self.shared.read(name, rows)
        return own

    def _read_own(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        codec = self._codecs[self._tensors[name].codec]
        if isinstance(codec, Dare):  # its mask is drawn for the whole tensor: decode it once
            with self._lock:
                if self._whole is None or self._whole[0] != name:
                    self._whole = (name, self._decode(name, None))
                whole = self._whole[1]
            return whole if rows is None else whole[rows[0] : rows[1]]
        return self._decode(name, rows)

    def part(self, name: str, key: str) -> torch.Tensor:
        """The stored part ``key`` of the tensor ``name`` (``alpha``, ``codes``...), as stored."""
        return self._blob.read(f"{name}::{key}")

    def _decode(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        t = self._tensors[name]
        parts = _BlobParts(self._blob, name, t.parts)
        try:
            return self._codecs[t.codec].decode(parts, t.shape, rows, name)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: cannot decode tensor {name!r} ({e})") from None

    def __repr__(self) -> str:
        return f"BlobCheckpoint({self.record.name!r}, {len(self._tensors)} tensors)"
