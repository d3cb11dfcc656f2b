"""How the process allocates memory: glibc settings for a streaming engine's large blocks."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from its heap and keep them when freed.

    By default every allocation above 32 MiB is a fresh ``mmap`` whose pages are faulted in and
    zeroed on first touch, and returned to the system on free, which costs more than the
    arithmetic on such tensors. Worker threads get arenas of at most 64 MiB, which send larger
    blocks to ``mmap`` too, so all threads share the main arena. Jobs allocate blocks of the
    same few sizes over and over, so reusing them is both faster and bounded by the working
    set. No-op off glibc.

    A thread keeps the arena it first got, and arenas of finished threads are handed to new
    ones, so this must run before any other thread allocates: ``import taskvec`` calls it
    before importing torch (which starts threads). Called later, a pool worker may inherit an
    arena whose 64 MiB heaps are mapped and unmapped around every large block (a 1.1B Model
    Stock merge faulted in twice the pages).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 28)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
