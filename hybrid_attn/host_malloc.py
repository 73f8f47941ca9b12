"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers in every step.

XLA:CPU allocates each executable's temporaries (1.5 GB for Twins-SVT-S's train step at
batch 8, 4 GB for CoAtNet-0's) and its outputs with ``posix_memalign`` on a worker thread.
glibc serves such a block with a fresh ``mmap`` (a worker thread's arena cannot hold more
than 64 MB, so it maps even with ``M_MMAP_MAX`` = 0) and unmaps it on ``free``, so every
step takes one page fault per 4 KiB page and the kernel zeroes the memory again: 393,616
minor faults per Twins-SVT-S step, which cost 10-15% of a one-thread train step, and a
51 MB elementwise result took 17 ms where 4 ms is the compute.

:func:`keep_freed_memory` sets, through ``mallopt``, one arena (``M_ARENA_MAX`` = 1, so
large blocks come from the main heap), no ``mmap`` for large blocks (``M_MMAP_MAX`` = 0)
and no trimming of the heap (``M_TRIM_THRESHOLD`` = -1), so a freed step's memory is reused
by the next step without faults. The cost: the process keeps its peak heap (it does not
return freed memory to the system), and all threads share one malloc arena. This is the
effect ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the
environment has, or the jemalloc/tcmalloc ``LD_PRELOAD`` often advised for CPU training,
without a preload or a restart.

It must run before XLA's worker threads first allocate (before the first computation; it
was measured to work after ``import jax, tensorflow``): a worker that already owns an arena
keeps it. The training, evaluation and benchmark entry points call it when the process
runs XLA on the CPU only; from a notebook call it first. On other C libraries (macOS,
musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

# Modules whose presence means JAX may run on an accelerator (GPU/TPU plugins).
_ACCELERATOR_MODULES = ("jax_plugins", "libtpu", "jaxlib.cuda", "jaxlib.rocm")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only; musl has no such symbol)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Applies :data:`SETTINGS` with ``mallopt``; True if glibc accepted all of them."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)


def cpu_only() -> bool:
    """Whether this process's JAX can only run on the CPU, decided without starting a
    backend: ``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    for name in _ACCELERATOR_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


def setup_for_entry_point() -> bool:
    """:func:`keep_freed_memory` where JAX runs on the CPU only, unless
    ``HYBRID_ATTN_MALLOC=default``; returns whether the settings were applied."""
    if os.environ.get("HYBRID_ATTN_MALLOC", "").lower() == "default" or not cpu_only():
        return False
    return keep_freed_memory()
