"""The store's catalogue: one SQLite database of :class:`VectorRecord` rows.

SQLite in WAL mode lets readers go on while one writer commits; a writer waits for another
(``busy_timeout``) instead of failing, and every change is one ``BEGIN IMMEDIATE``
transaction, so two processes adding vectors at once both land, and a name is taken once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import CheckpointError, ConfigError
from taskvec.store.records import TensorRecord, VectorRecord

BUSY_TIMEOUT_MS = 60_000
SCHEMA_VERSION = 1  # PRAGMA user_version: bump with a migration when the schema changes
SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    name TEXT PRIMARY KEY,
    blob TEXT NOT NULL,
    codec TEXT NOT NULL,
    created TEXT NOT NULL,
    base_fingerprint TEXT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tensors (
    vector TEXT NOT NULL REFERENCES vectors(name) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    codec TEXT NOT NULL,
    parts TEXT NOT NULL,
    bits REAL NOT NULL,
    rel_error REAL NOT NULL,
    norm REAL NOT NULL,
    sparsity REAL NOT NULL,
    PRIMARY KEY (vector, name)
);
"""
_TENSOR_COLUMNS = "name, shape, dtype, codec, parts, bits, rel_error, norm, sparsity"


class NameTaken(ConfigError):
    """A vector of that name is already in the store."""


class Catalogue:
    """The SQLite catalogue at ``path`` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CheckpointError(
                    f"{path}: catalogue version {version}, made by a newer taskvec (this one "
                    f"reads version {SCHEMA_VERSION})"
                )
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def insert(self, record: VectorRecord, replace: bool = False) -> None:
        """Add ``record``; :class:`NameTaken` if its name exists (unless ``replace``)."""
        meta = record.to_json()
        del meta["tensors"]
        with self._write() as db:
            taken = db.execute("SELECT 1 FROM vectors WHERE name = ?", (record.name,)).fetchone()
            if taken and not replace:
                raise NameTaken(f"the store already holds a vector named {record.name!r}")
            db.execute("DELETE FROM vectors WHERE name = ?", (record.name,))
            db.execute(
                "INSERT INTO vectors VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.blob,
                    record.codec,
                    record.created,
                    record.base_fingerprint,
                    json.dumps(meta, sort_keys=True),
                ),
            )
            db.executemany(
                f"INSERT INTO tensors (vector, position, {_TENSOR_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        record.name,
                        i,
                        t.name,
                        json.dumps(list(t.shape)),
                        t.dtype,
                        t.codec,
                        json.dumps(list(t.parts)),
                        t.bits,
                        t.rel_error,
                        t.norm,
                        t.sparsity,
                    )
                    for i, t in enumerate(record.tensors)
                ],
            )

    def delete(self, name: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM vectors WHERE name = ?", (name,)).rowcount > 0

    def names(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT name FROM vectors ORDER BY name")]

    def get(self, name: str) -> VectorRecord | None:
        with self._connect() as db:
            db.execute("BEGIN")  # one snapshot for both queries
            row = db.execute("SELECT record FROM vectors WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            rows = db.execute(
                f"SELECT {_TENSOR_COLUMNS} FROM tensors WHERE vector = ? ORDER BY position",
                (name,),
            ).fetchall()
            db.execute("COMMIT")
        data = json.loads(row[0])
        data["tensors"] = [
            TensorRecord(n, tuple(json.loads(s)), d, c, tuple(json.loads(p)), b, e, no, sp)
            for n, s, d, c, p, b, e, no, sp in rows
        ]
        return VectorRecord(**data)

    def blobs_in_use(self) -> set[str]:
        """Every blob a record names (its tensors' and its artefacts')."""
        with self._connect() as db:
            used = set()
            for blob, record in db.execute("SELECT blob, record FROM vectors"):
                used.add(blob)
                used.update(json.loads(record).get("artefacts", {}).values())
        return used
