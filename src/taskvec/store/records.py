"""What the store records about a task vector: the catalogue row and its JSON form.

A record names the blob holding the encoded tensors and describes them without reading it:
the base the vector applies to (its content fingerprint, see
:func:`taskvec.io.fingerprint.content_fingerprint`, and a :func:`header_hash` of its tensor
names, shapes and dtypes that refuses a wrong base from headers alone), one
:class:`TensorRecord` per tensor, statistics, provenance and optional artefacts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from taskvec.io.checkpoint import Checkpoint
from taskvec.io.dtypes import dtype_name

HEADER_SCHEME = "h1"


def header_hash(ckpt: Checkpoint) -> str:
    """``h1:`` and 32 hex digits of sha256 over every tensor's name, shape and dtype, in
    name order: read from headers only, so it is free to compare before any weight is read."""
    h = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        h.update(f"{name}|{list(info.shape)}|{dtype_name(info.dtype)};".encode())
    return f"{HEADER_SCHEME}:{h.hexdigest()[:32]}"


@dataclass(frozen=True)
class TensorRecord:
    """One stored tensor: its shape and dtype, codec, measured error and statistics."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str
    parts: tuple[str, ...]  # the blob's tensors holding it: ``name::part``
    bits: float  # stored bits per parameter
    rel_error: float  # ‖τ − decode(encode(τ))‖ / ‖τ‖ (0 for τ = 0)
    norm: float  # ‖τ‖
    sparsity: float  # fraction of exact zeros in τ

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class VectorRecord:
    """A stored task vector."""

    name: str
    blob: str  # sha256 of the blob
    codec: str
    created: str
    base_fingerprint: str | None
    base_header: str | None
    base_path: str | None
    tensors: list[TensorRecord]
    blob_bytes: int
    description: str = ""
    tags: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, str] = field(default_factory=dict)  # kind -> blob sha256
    residual_of: str | None = None  # a stored vector this one is an offset on (RTVQ)
    blob_checksum: str | None = None  # xxh3-128 of the blob, checked on read (else sha256)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def norm(self) -> float:
        return sum(t.norm**2 for t in self.tensors) ** 0.5

    @property
    def bits(self) -> float:
        """Stored bits per parameter over the whole vector (the blob's bytes, header included)."""
        return 8 * self.blob_bytes / max(1, self.params)

    @property
    def rel_error(self) -> float:
        """‖τ − τ̂‖ / ‖τ‖ over the whole vector."""
        err = sum((t.rel_error * t.norm) ** 2 for t in self.tensors) ** 0.5
        return err / self.norm if self.norm > 0 else 0.0

    @property
    def sparsity(self) -> float:
        return sum(t.sparsity * t.numel for t in self.tensors) / max(1, self.params)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VectorRecord:
        fields = dict(data)
        fields["tensors"] = [
            TensorRecord(**{**t, "shape": tuple(t["shape"]), "parts": tuple(t["parts"])})
            for t in data["tensors"]
        ]
        return cls(**fields)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
