"""Host (CPU-side) settings that must be made before jax starts its threads."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_host_allocator() -> bool:
    """Keeps freed host memory in the process so XLA's buffers are reused, not re-faulted.

    XLA:CPU allocates every large temporary with malloc, which glibc serves with a fresh
    mmap (per-thread arenas ignore ``M_MMAP_MAX``): the ConvNet-3 training step touched
    ~1.1 GB of new pages per step (~280k page faults) and an elementwise op over 100 MB
    took 110 ms instead of 11 ms. One arena, no mmap and no trimming make malloc reuse the
    same pages every step. Changes this process only; call it before jax is imported.
    Skipped (returns False) off glibc or with ``WMDD_HOST_ALLOCATOR=default``.
    """
    if os.environ.get("WMDD_HOST_ALLOCATOR", "tuned") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) == 1
               for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
