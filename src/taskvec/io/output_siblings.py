"""The hidden siblings of an output folder ``OUT``: its lock, temporary, backup and partial
folders, and what dead writers left of them.

- ``.OUT.lock``: an exclusive ``flock`` held by the one process writing ``OUT`` (it holds its
  PID, for the message a second writer gets); removed when the writer finishes.
- ``.OUT.tmp-<pid>-<random>``: where a writer builds the output before renaming it onto OUT.
- ``.OUT.old-<pid>``: the replaced output, where an atomic swap is not available.
- ``.OUT.partial``: a resumable merge's output in progress (not PID-named: a later run
  continues it; see :mod:`taskvec.io.journal`).

A process killed outright (SIGKILL, power loss) leaves its temporary or backup folder; the next
writer of the same output, once it holds the lock, removes those whose PID is not alive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from taskvec.errors import OutputError
from taskvec.io.durable import make_folder

log = logging.getLogger("taskvec")


def partial_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def backup_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def new_temporary_folder(out: Path) -> Path:
    """A fresh ``.OUT.tmp-<pid>-<random>`` folder (created with the umask applied)."""
    while True:
        path = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            make_folder(path)
        except FileExistsError:
            continue
        return path


class OutputLock:
    """Exclusive ownership of ``out`` by this process, until :meth:`release`.

    Raises :class:`OutputError` at once if another process holds it. The lock file is removed
    on release, while still locked: a writer that opened it before then finds, once it holds
    the lock, that the name now points elsewhere, and tries again."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(f".{out.name}.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                raise OutputError(
                    f"{out}: is being written by another taskvec process (pid {holder})"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # at offset 0: just opened
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_siblings(out: Path) -> None:
    """Remove the temporary and backup folders of ``out`` left by processes no longer alive
    (call while holding its :class:`OutputLock`), with one log line each."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-\w+|old-(\d+))")
    for entry in out.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s, left by an interrupted taskvec run (pid %d)", entry, pid)
