"""File-system steps an output's commit relies on: fsync, folders made like ``mkdir`` does, and
atomic renames that never replace (or that swap) a folder.

Linux's ``renameat2`` gives both atomic renames (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``);
it is called through the C library, or the raw system call where the C library predates it.
Where neither works (another OS, a file system without the flags) :func:`exchange` says so and
:func:`rename_no_replace` checks, then renames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_SYSCALL_NUMBER = {"x86_64": 316, "aarch64": 276}  # renameat2 where the C library lacks it
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)


def _renameat2() -> Callable[[bytes, bytes, int], int] | None:
    """``renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags)`` returning 0 or -1 (errno set)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    args = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    try:
        call = libc.renameat2
        call.argtypes, call.restype = args, ctypes.c_int
        return lambda src, dst, flags: call(_AT_FDCWD, src, _AT_FDCWD, dst, flags)
    except AttributeError:
        pass
    number = _SYSCALL_NUMBER.get(platform.machine())
    if number is None or not hasattr(libc, "syscall"):
        return None
    syscall = libc.syscall
    syscall.argtypes, syscall.restype = [ctypes.c_long, *args], ctypes.c_long
    return lambda src, dst, flags: syscall(number, _AT_FDCWD, src, _AT_FDCWD, dst, flags)


_rename2 = _renameat2()


def _rename_with(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2`` with ``flags``; False where it is not available for them."""
    if _rename2 is None:
        return False
    if _rename2(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (even an empty folder,
    which a plain rename would silently replace)."""
    if _rename_with(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(src: Path, dst: Path) -> bool:
    """Swap ``src`` and ``dst`` atomically (both must exist); False where not available."""
    return _rename_with(src, dst, _RENAME_EXCHANGE)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(path: Path) -> None:
    """``mkdir`` (the umask applies, unlike ``tempfile.mkdtemp``'s 0700), durably: the
    folder holding it is fsynced."""
    os.mkdir(path)
    fsync_path(path.parent)


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``, outermost first; returns those created."""
    made = []
    for folder in [p for p in path.parents if not p.exists()][::-1]:
        try:
            make_folder(folder)
        except FileExistsError:  # made meanwhile by someone else
            continue
        made.append(folder)
    return made


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace (or create) the file ``path`` with ``data`` in one rename: a reader sees the
    old file or the whole new one, never a part; fsynced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
