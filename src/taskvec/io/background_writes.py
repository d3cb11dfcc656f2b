"""Output writes done in the background: one thread copies tensors into the files, another
starts the disk writes of what is already in them.

The threads that compute never wait for a file: the kernel lets one buffered write into a file
at a time (two workers writing the same shard spent 11-15 % of a merge's CPU spinning on that
lock), so a single writing thread loses nothing. The disk writes, which a final ``fsync`` would
otherwise wait for (0.55 s for a 2.2 GB output here), then overlap the computation: by the time
the output is committed they are done.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from taskvec.errors import OutputError

# Bytes of tensors that may wait for the writing thread before ``put`` blocks (a larger
# tensor is taken alone).
QUEUED_BYTES = 64 * 1024**2

_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages; do not wait for them


def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """``sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)`` where the C library has
    it (Linux), else None."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library's symbols
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_start_writeback = _writeback_starter()


@dataclass
class Write:
    fd: int
    offset: int
    data: memoryview
    keep: torch.Tensor  # owns the memory ``data`` points into
    done: Callable[[], None] | None = None  # called by the writing thread once written


class _Writeback:
    """A thread that starts the disk writes of ranges already copied into their files (best
    effort: errors surface in the final ``fsync``). It may block while the disk is busy, which
    is why it is not the writing thread."""

    def __init__(self, start: Callable[[int, int, int], object]) -> None:
        self._start = start
        self._ranges: deque[tuple[int, int, int]] = deque()
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="taskvec-writeback", daemon=True)
        self._thread.start()

    def add(self, fd: int, offset: int, length: int) -> None:
        with self._changed:
            self._ranges.append((fd, offset, length))
            self._changed.notify()

    def close(self) -> None:
        """Stop once the ranges given so far are started (their files must stay open until
        this returns)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._ranges and not self._closed:
                    self._changed.wait()
                if not self._ranges:
                    return
                ranges = list(self._ranges)
                self._ranges.clear()
            for fd, offset, length in ranges:
                self._start(fd, offset, length)


class WriteQueue:
    """``pwrite`` calls done in order by one thread, with at most ``limit`` bytes waiting, and
    the disk writes of what they wrote started in the background.

    The first failure is kept: it is raised by the next :meth:`put` or :meth:`drain`, and the
    writes still waiting are dropped."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._waiting: deque[Write] = deque()
        self._bytes = 0
        self._closed = False
        self._error: OSError | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._writeback: _Writeback | None = None

    def put(self, write: Write) -> None:
        with self._changed:
            while (
                self._bytes
                and self._bytes + len(write.data) > self._limit
                and not (self._error or self._closed)
            ):
                self._changed.wait()
            self._check_open()
            self._waiting.append(write)
            self._bytes += len(write.data)
            if self._thread is None:
                if _start_writeback is not None:
                    self._writeback = _Writeback(_start_writeback)
                self._thread = threading.Thread(
                    target=self._run, name="taskvec-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def check_open(self) -> None:
        """Raise the first failure, or refuse a queue that was closed."""
        with self._changed:
            self._check_open()

    def drain(self) -> None:
        """Wait until every write is done; raise the first failure."""
        with self._changed:
            while self._waiting and not self._error:
                self._changed.wait()
            self._raise_error()

    def close(self) -> None:
        """Stop the threads once the writes waiting are done (dropped after a failure)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._writeback is not None:
            self._writeback.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise OutputError(f"writing the output failed: {self._error}") from self._error

    def _check_open(self) -> None:
        self._raise_error()
        if self._closed:
            raise OutputError("internal: a tensor was written after the output was closed")

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting or self._error:
                    return
                write = self._waiting[0]
            try:
                done = 0
                while done < len(write.data):
                    done += os.pwrite(write.fd, write.data[done:], write.offset + done)
                if self._writeback is not None:
                    self._writeback.add(write.fd, write.offset, done)
                if write.done is not None:
                    write.done()
            except OSError as e:
                with self._changed:
                    self._error = e
                    self._waiting.clear()
                    self._bytes = 0
                    self._changed.notify_all()
                return
            with self._changed:
                self._waiting.popleft()
                self._bytes -= len(write.data)
                self._changed.notify_all()
