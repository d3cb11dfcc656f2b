"""Equip a base model with stored task vectors: ``base + Σ λᵢ τᵢ``, or any merge method.

The base is checked against every vector's record before a weight is read: first the header
hash (tensor names, shapes and dtypes: free), then the content fingerprint (hashed once per
weight file, then cached; see :mod:`taskvec.io.fingerprint`); a mismatch is refused in one
line naming both fingerprints. Each vector's blob is then checked (sha256) as it is opened.

``task_arithmetic`` (the default) streams ``base + Σ λᵢ τ̂ᵢ`` through the task-vector algebra,
reading the base once. Any other method runs through :func:`taskvec.merge.merge` with each
vector as a model ``store:NAME`` (``base + τ̂``, see :mod:`taskvec.model_view`) and its λ as
the model's ``weight``; ``parameters`` are the config's top-level parameters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from taskvec.algebra import CheckpointModel, apply
from taskvec.errors import ConfigError, IncompatibleError
from taskvec.io.checkpoint import Checkpoint, open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.store.records import VectorRecord, header_hash
from taskvec.store.store import Store
from taskvec.store.vector import STORE_PREFIX, BlobCheckpoint

log = logging.getLogger("taskvec")

_current: ContextVar[Store | None] = ContextVar("taskvec_store", default=None)


@contextmanager
def using_store(store: Store) -> Iterator[None]:
    """Resolve ``store:NAME`` references against ``store`` meanwhile."""
    token = _current.set(store)
    try:
        yield
    finally:
        _current.reset(token)


def open_store_reference(ref: str) -> BlobCheckpoint | None:
    """The stored vector a merge config names as ``store:NAME`` (in the store of
    :func:`using_store`, else the default one); ``None`` for any other reference."""
    if not ref.startswith(STORE_PREFIX):
        return None
    store = _current.get() or Store()
    return store.checkpoint(ref[len(STORE_PREFIX) :])


def parse_terms(terms: Sequence[str]) -> list[tuple[str, float]]:
    """``NAME[:λ]`` arguments as (name, λ), λ = 1 when not given."""
    out = []
    for term in terms:
        name, sep, value = term.partition(":")
        try:
            out.append((name, float(value) if sep else 1.0))
        except ValueError:
            raise ConfigError(f"{term!r}: expected NAME or NAME:λ (a number)") from None
    return out


def check_base(record: VectorRecord, base: Checkpoint) -> None:
    """Refuse ``base`` unless it is the base ``record`` was made on (headers first)."""
    want = record.base_fingerprint
    if want is None:
        log.warning("stored vector %r records no base fingerprint: not checked", record.name)
        return
    if record.base_header is not None and (have := header_hash(base)) != record.base_header:
        raise IncompatibleError(
            f"stored vector {record.name!r} was made on base {want} (header "
            f"{record.base_header}), not {base.path} (header {have}: its tensor names, shapes "
            "or dtypes differ)"
        )
    if (fp := content_fingerprint(base)) != want:
        raise IncompatibleError(
            f"stored vector {record.name!r} was made on base {want} "
            f"({record.base_path}), not {base.path} ({fp})"
        )


def equip(
    store: Store,
    base: str | os.PathLike[str],
    terms: Sequence[tuple[str, float]],
    out: str | os.PathLike[str],
    *,
    method: str = "task_arithmetic",
    parameters: dict[str, Any] | None = None,
    any_base: bool = False,
    **save: Any,
) -> Path:
    """Write ``base`` equipped with the stored vectors ``terms`` (name, λ) to ``out``;
    ``save`` are the output options (dtype, shard_size, threads, overwrite, progress)."""
    if not terms:
        raise ConfigError("name at least one stored vector to equip")
    plain = method == "task_arithmetic" and not parameters
    if any_base and not plain:
        raise ConfigError("--any-base equips with plain task arithmetic only (no --method)")
    records = [store.get(name) for name, _ in terms]
    base_ckpt = open_checkpoint(base)
    if not any_base:
        for record in records:
            check_base(record, base_ckpt)
    with ThreadPoolExecutor(len(terms)) as pool:  # every blob's sha256 checked, in parallel
        vectors = list(pool.map(store.vector, [name for name, _ in terms]))
    if plain:
        weighted = [lam * v for (_, lam), v in zip(terms, vectors, strict=True)]
        model = apply(CheckpointModel(base_ckpt), weighted, allow_other_base=True)
        return model.save(out, **save)
    from taskvec.merge import merge

    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": f"{STORE_PREFIX}{n}", "parameters": {"weight": w}} for n, w in terms],
        "parameters": dict(parameters or {}),
    }
    options = {k: v for k, v in save.items() if k != "dtype"}
    if save.get("dtype") is not None:
        config["out_dtype"] = save["dtype"]
    with using_store(store):
        merge(config, out, **options)
    return Path(out)
