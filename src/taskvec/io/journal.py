"""The journal of a resumable output: which pieces (tensor, rows, checksum) are durably written.

A text file: a JSON header line ``{"taskvec_journal": 1, "identity": ...}`` (what the output is:
see :func:`taskvec.io.manifest.identity`), then one JSON line ``[tensor, start, stop, digest]``
per finished row piece. Pieces are appended in batches, and only once the bytes they describe
are on the disk: the shard files are ``fdatasync``-ed, then the lines appended and the journal
fsynced. A batch goes every :data:`FLUSH_BYTES` written or :data:`FLUSH_SECONDS`, whichever
comes first, so the syncs cost little; a killed run loses at most that much work. A last
line cut short by a crash is dropped when the journal is read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from taskvec import faults

FLUSH_BYTES = 256 << 20
FLUSH_SECONDS = 2.0
_FORMAT = 1


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of a tensor (one row for a 0-d tensor) and their checksum."""

    tensor: str
    start: int
    stop: int
    digest: str


def read_journal(path: Path) -> tuple[str | None, list[Piece]]:
    """The identity and the pieces of a journal (None and no pieces if it is unreadable)."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]  # the last is empty, or cut short
        head = json.loads(lines[0])
        pieces = [Piece(*json.loads(line)) for line in lines[1:]]
    except (OSError, ValueError, TypeError, IndexError):
        return None, []
    if not isinstance(head, dict) or head.get("taskvec_journal") != _FORMAT:
        return None, []
    return head.get("identity"), pieces


class Journal:
    """Appends finished pieces to the journal at ``path`` once their bytes are durable."""

    def __init__(self, path: Path, identity: str) -> None:
        """Open the journal of ``identity`` (created, or continued after its last full line)."""
        if read_journal(path)[0] != identity:
            header = json.dumps({"taskvec_journal": _FORMAT, "identity": identity}) + "\n"
            tmp = path.with_name(path.name + ".new")
            with open(tmp, "w") as f:
                f.write(header)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND)
        size = os.fstat(self._fd).st_size
        whole = os.pread(self._fd, size, 0).rfind(b"\n") + 1
        if whole != size:  # a line cut short by a crash
            os.ftruncate(self._fd, whole)
        os.fsync(self._fd)
        self._lock = threading.Lock()
        self._waiting: list[Piece] = []
        self._files: set[int] = set()
        self._bytes = 0
        self._since = time.monotonic()

    def add(self, piece: Piece, fd: int, nbytes: int) -> None:
        """Record a piece whose bytes were just written to the file ``fd``."""
        with self._lock:
            self._waiting.append(piece)
            self._files.add(fd)
            self._bytes += nbytes
            due = self._bytes >= FLUSH_BYTES or time.monotonic() - self._since >= FLUSH_SECONDS
            if due:
                self._flush()

    def flush(self) -> None:
        """Make every piece recorded so far durable, and journal it."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._waiting:
            for fd in self._files:
                os.fdatasync(fd)
            lines = "".join(
                json.dumps([p.tensor, p.start, p.stop, p.digest]) + "\n" for p in self._waiting
            )
            os.write(self._fd, lines.encode())
            os.fsync(self._fd)
            faults.reached("journal-flushed")
        self._waiting, self._files, self._bytes = [], set(), 0
        self._since = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
