"""Step memory that stays mapped, so an XLA:CPU train step stops page-faulting it.

XLA:CPU allocates each executable's temporaries (1.2 GiB for Twins-SVT-S's train step at
batch 8, 3.5 GiB for CoAtNet-0's) and its outputs with ``posix_memalign``. glibc serves a
block that large with a fresh ``mmap`` and unmaps it on ``free``, so every step faults the
memory in again: with glibc's defaults one 4 KiB page at a time (393,616 minor faults per
Twins-SVT-S step, 1.04 million per CoAtNet-0 step; CoAtNet-0's one-thread train step took
6.5 s against 4.6 s without the faults, 2-core Xeon). On a VM whose balloon device
reports free pages to the host (``VIRTIO_BALLOON_F_REPORTING``, as on the 2-core VM the
README's tables come from) the host also discards the unmapped pages, and touching them
again costs host faults: every other Twins-SVT-S step there spent 0.6-0.7 s more in the
kernel.

What this module sets, for a process that runs JAX on the CPU only:

* glibc tunables ``glibc.malloc.hugetlb=1`` (transparent huge pages for the blocks it
  maps: one fault per 2 MiB), ``glibc.malloc.mmap_max=0`` (large blocks come from the
  main heap instead of their own mappings) and ``glibc.malloc.trim_threshold`` at 1 TiB
  (freed heap memory is kept, not returned to the kernel);
* ``jax_cpu_enable_async_dispatch=False``: XLA:CPU runs a computation on the calling
  thread, so its temporaries come from the main heap. With asynchronous dispatch they are
  allocated on a worker thread, whose glibc arena (at most 64 MiB of heap) still maps
  every larger block afresh whatever the tunables say. The computation itself still uses
  XLA's intra-op thread pool; only the Python thread waits for it.

Then a step reuses the same memory. Twins-SVT-S's train step (batch 8, float32) on that
VM, 4 steps after 2 warm-up ones in each of two processes per setting, alternated:

| per step | huge pages only (the previous setting) | this module |
|---|---|---|
| 1 thread: ms | 1765-2281 | 1637-1755 |
| minor faults / kernel s | 842-1577 / 0.16-0.60 | 0-65 / 0.000-0.008 |
| 2 threads: ms | 1022-1068 | 900-1016 |
| minor faults / kernel s | 984-1424 / 0.17-0.22 | 0-735 / 0.003-0.021 |

Tried, not used: ``glibc.malloc.arena_max=1`` (one arena for every thread, which also
keeps worker-thread blocks) made XLA's two-thread compilation 40-50% slower; the settings
above left it unchanged (Twins-SVT-S with the scan path, two runs each: 8.5 and 9.1
against 8.7 and 9.6 s).

A tunable is read when the process starts, so :func:`configure_process` restarts the entry
point (``os.execve`` with the same arguments) with ``GLIBC_TUNABLES`` extended, before
anything heavy is imported, and in the restarted process switches off asynchronous
dispatch. The training, evaluation and benchmark entry points call it; it acts when JAX
runs on the CPU only (``JAX_PLATFORMS=cpu`` or no GPU/TPU plugin), the kernel offers
transparent huge pages (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
``madvise``) and ``HYBRID_ATTN_MALLOC`` is not ``default``. Elsewhere (a notebook,
another entry point) start Python with ``GLIBC_TUNABLES`` set to ``":".join(TUNABLES)``
and call :func:`configure_process` (or set ``jax_cpu_enable_async_dispatch`` to False)
before the first computation. The cost: the process keeps its peak heap (the step's
temporaries) mapped between steps, and large blocks are rounded up to 2 MiB pages.

The heap still grows during a process's first calls (ResNet-50's inference at batch 8 on
one thread: 3,517 faults in the first call, about 300 in the second, none after), and on
that VM fresh memory can cost far more than its faults suggest (a second call took 1032
ms against 620-640 for the later ones, 0.38 s of it in the kernel for 357 faults; one
process of five had such a call fifth, 58 faults): time steps after two warm-up calls
(``python -m hybrid_attn.bench --warmup 2``) and take the median.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0",
            "glibc.malloc.trim_threshold=1099511627776")
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


def with_tunables(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`TUNABLES` in its ``GLIBC_TUNABLES`` (other tunables are kept;
    other values of these three are replaced)."""
    names = {t.split("=", 1)[0] for t in TUNABLES}
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and t.split("=", 1)[0] not in names]
    return {**env, "GLIBC_TUNABLES": ":".join([*tunables, *TUNABLES])}


def wanted() -> bool:
    """Whether this process should run with :data:`TUNABLES` (see the module docstring)."""
    return (sys.platform.startswith("linux")
            and os.environ.get("HYBRID_ATTN_MALLOC", "").lower() != "default"
            and cpu_only() and transparent_hugepages())


def active() -> bool:
    """Whether this process was started with all of :data:`TUNABLES`."""
    return set(TUNABLES) <= set(os.environ.get("GLIBC_TUNABLES", "").split(":"))


def configure_process() -> None:
    """Call it first thing in an entry point. Restarts this process with
    :data:`TUNABLES` when :func:`wanted` and not yet :func:`active`; once they are active,
    switches off JAX's asynchronous CPU dispatch (before any computation creates the
    backend). Does nothing otherwise."""
    if not active():
        if not wanted() or not getattr(sys, "orig_argv", None):
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(sys.orig_argv), with_tunables(dict(os.environ)))
    import jax  # noqa: PLC0415 (after the restart decision: jax is heavy)

    jax.config.update("jax_cpu_enable_async_dispatch", False)
