"""Huge pages for XLA:CPU's large buffers, so a train step stops page-faulting them.

XLA:CPU allocates each executable's temporaries (1.4 GiB for Twins-SVT-S's train step at
batch 8, 3.5 GiB for CoAtNet-0's) and its outputs with ``posix_memalign`` on a worker
thread. glibc serves such a block with a fresh ``mmap`` (a worker thread's arena holds at
most 64 MB) and unmaps it on ``free``, so every step faults the memory in again, one 4 KiB
page at a time: 393,616 minor faults per Twins-SVT-S step and 1.04 million per CoAtNet-0
step, 30% of CoAtNet-0's one-thread train step on a 2-core Xeon (6.5 s against 4.4-4.6
s without the faults), and a 51 MB elementwise result took 17 ms where 4 ms is the compute.

The fix used here is glibc's tunable ``glibc.malloc.hugetlb=1``: malloc then asks for
transparent huge pages (``madvise(MADV_HUGEPAGE)``) on the blocks it maps, so a step takes
one fault per 2 MiB. Measured on that machine, one run each (``python -m hybrid_attn.bench
--batch 8 --mode train --steps 3 --warmup 1``, ms per step / compile s, ours only):

| | glibc default | ``hugetlb=1`` | one arena, no mmap, no trim (mallopt) |
|---|---|---|---|
| CoAtNet-0, 1 thread | 6496 / 15.8 | 4560 / 15.6 | 4409 / 15.8 |
| CoAtNet-0, 2 threads | 3234 / 10.0 | 2639 / 9.6 | 2658 / 14.6 |
| Twins-SVT-S, 2 threads | 1374 / 13.8 | 1164 / 14.7 | 1310 / 21.1 |

The third column (``mallopt(M_ARENA_MAX=1, M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)``, which
removes the faults altogether) is not used: one malloc arena for all threads made XLA's
two-thread compilation 40-50% slower.

A tunable is read when the process starts, so :func:`reexec_with_hugepages` restarts the
entry point (``os.execve`` with the same arguments) with ``GLIBC_TUNABLES`` extended,
before anything heavy is imported. The training, evaluation and benchmark entry points
call it when JAX runs on the CPU only (``JAX_PLATFORMS=cpu`` or no GPU/TPU plugin), the
kernel offers transparent huge pages (``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``) and ``HYBRID_ATTN_MALLOC`` is not ``default``. Elsewhere (a
notebook, another entry point) start Python with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment. The cost is memory rounded
up to 2 MiB pages for large blocks only.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Modules whose presence means JAX may run on an accelerator (GPU/TPU plugins).
_ACCELERATOR_MODULES = ("jax_plugins", "libtpu", "jaxlib.cuda", "jaxlib.rocm")


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


def transparent_hugepages(path: pathlib.Path = _THP) -> bool:
    """Whether the kernel gives transparent huge pages to ``madvise``d memory."""
    try:
        mode = path.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def with_tunable(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`TUNABLE` added to its ``GLIBC_TUNABLES`` (kept otherwise)."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    tunables = [t for t in tunables if not t.startswith("glibc.malloc.hugetlb=")] + [TUNABLE]
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)}


def wanted() -> bool:
    """Whether this process should run with :data:`TUNABLE` (see the module docstring)."""
    return (sys.platform.startswith("linux")
            and os.environ.get("HYBRID_ATTN_MALLOC", "").lower() != "default"
            and cpu_only() and transparent_hugepages())


def active() -> bool:
    """Whether this process was started with :data:`TUNABLE`."""
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_hugepages() -> None:
    """Restarts this process with :data:`TUNABLE` when :func:`wanted` and not yet
    :func:`active`; call it first thing in an entry point. Returns otherwise."""
    if active() or not wanted() or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), with_tunable(dict(os.environ)))
