"""Keep freed memory in the process's heap while a render loop runs (glibc only).

A render repeats the same forward and backward hundreds of times, and every step allocates
and frees the same large tensors (``efficientnet_lite0``'s ``blocks.1`` at 224 px: 38 MB
per activation of a batch of 8). glibc's ``malloc`` serves an allocation above its mmap
threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when it is
freed, so every step pays the kernel to fault in and zero those pages again. Measured on
a 2-core Sapphire Rapids (``benchmarks/README.md``, "microscope.py"): 30-40% of a render
step went to page faults, ``fill_`` and ``copy_`` on fresh memory.

:func:`keep_heap` turns that off for the duration of a loop: ``mallopt(M_MMAP_MAX, 0)``
(large blocks come from the heap) and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` (freed
memory stays in it), then puts glibc's defaults back and ``malloc_trim(0)`` returns the
memory to the system. It changes no number a render computes, only where its buffers
come from; the process's peak memory is the same. It does nothing off glibc (macOS,
Windows, musl), when the user has set any ``MALLOC_*_`` tuning variable (their choice
stands), with ``CONVLENS_KEEP_HEAP=0``, or while :data:`ENABLED` is false (benchmarks set
it to measure the code as it was).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["ENABLED", "heap_kept", "keep_heap"]

#: turned off by benchmarks that measure renders as they ran before this existed
ENABLED = True

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on the way out
_DEFAULT_TRIM = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_USER_TUNING = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)

_lock = threading.Lock()
_depth = 0
_libc: Any = None


def _glibc() -> Any:
    """The C library when it is glibc (``mallopt`` and ``malloc_trim`` there), else None."""
    global _libc
    if _libc is None:
        lib: Any = False
        if sys.platform.startswith("linux"):
            try:
                c = ctypes.CDLL(None)
                if hasattr(c, "gnu_get_libc_version") and hasattr(c, "mallopt"):
                    c.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    c.mallopt.restype = ctypes.c_int
                    c.malloc_trim.argtypes = [ctypes.c_size_t]
                    c.malloc_trim.restype = ctypes.c_int
                    lib = c
            except OSError:
                lib = False
        _libc = lib
    return _libc or None


def _wanted() -> bool:
    if not ENABLED or os.environ.get("CONVLENS_KEEP_HEAP", "1") == "0":
        return False
    return not any(k in os.environ for k in _USER_TUNING)


def heap_kept() -> bool:
    """Whether a :func:`keep_heap` block is active in this process now.

    Example:
        >>> heap_kept()
        False
    """
    return _depth > 0


@contextlib.contextmanager
def keep_heap() -> Iterator[None]:
    """Serve and keep large allocations in the heap while the block runs (see the module's
    docstring); nested and concurrent blocks share one setting, restored by the last out.

    Example:
        >>> with keep_heap():
        ...     pass
    """
    global _depth
    libc = _glibc() if _wanted() else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.malloc_trim(0)
