"""Host (CPU-side) settings that must be made before jax starts its threads."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
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
    Skipped (returns False) off glibc, with ``WMDD_HOST_ALLOCATOR=default``, and when jax will run
    on an accelerator (its buffers are then device memory, not malloc's; the tuning was measured
    for XLA:CPU only).
    """
    if (os.environ.get("WMDD_HOST_ALLOCATOR", "tuned") == "default" or not sys.platform.startswith("linux")
            or accelerator_backend()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) == 1
               for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


_TPU_DEVICE_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def tpu_present() -> bool:
    """Whether this host has TPU chips (their device files), told without starting jax."""
    return any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES)


def skip_absent_tpu() -> bool:
    """Keeps jax from starting an installed libtpu on a host without TPU chips; call before jax starts.

    libtpu (installed to compile for TPU targets, `wmdd_jax.plan`) is tried at every start of jax and
    prints warnings when no chip is there. Where ``JAX_PLATFORMS`` is unset, libtpu is installed and no
    TPU device file exists, this sets ``JAX_PLATFORMS`` to the platforms that are present (``cpu``, with
    ``cuda`` first where a CUDA plugin and GPU device files are). Compiling for a TPU topology still
    works (`jax.experimental.topologies`). Returns whether it set the variable.
    """
    if os.environ.get("JAX_PLATFORMS", "").strip() or tpu_present() or importlib.util.find_spec("libtpu") is None:
        return False
    cuda = glob.glob("/dev/nvidia[0-9]*") and any(importlib.util.find_spec(name) is not None
                                                   for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"
    return True


def accelerator_backend() -> bool:
    """Whether jax will pick a GPU or TPU, told without starting jax (which fixes its threads).

    ``JAX_PLATFORMS`` decides when set; otherwise an installed jax plugin with its device files.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    plugins = {"jax_cuda12_plugin": "/dev/nvidia[0-9]*", "jax_cuda13_plugin": "/dev/nvidia[0-9]*",
               "jax_rocm60_plugin": "/dev/kfd"}
    if tpu_present() and importlib.util.find_spec("libtpu") is not None:
        return True
    return any(glob.glob(devices) and importlib.util.find_spec(name) is not None
               for name, devices in plugins.items())
