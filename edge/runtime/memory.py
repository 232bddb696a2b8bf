"""Giving memory back to the system after a large release (a model version closed or replaced), and the process's peak."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

log = logging.getLogger("edgejit.runtime")

_libc = None


def _malloc_trim():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            _libc = False
    return _libc.malloc_trim if _libc else None


def release_memory() -> None:
    """Free what reference cycles still hold, then return free heap pages to the system.

    glibc keeps memory freed in a thread's malloc arena for reuse instead of returning it, and
    the daemon loads each version on a different thread (the reload's): without a trim, every
    swap left the last version's load buffers and weights resident (+50 MiB per swap of a small
    decoder), although nothing used them."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc keeps them for reuse otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_rss_bytes() -> int:
    """The most resident memory this process has had (Linux counts it in KiB, macOS in bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
