"""Per-backend choice of an op's form, made when the op is traced.

The fast paths here (:mod:`~hybrid_attn.models.layers.conv`'s depthwise and dense
convolutions, :mod:`~hybrid_attn.models.layers.dense`'s matrix product,
:mod:`~hybrid_attn.models.layers.pooling`'s max pooling, the attention kernels) are
numerically equal forms of one op, one for XLA:CPU and one for every other backend.
``jax.lax.platform_dependent`` would trace and lower every form and let the lowering keep
one, which lets one traced program be exported for several platforms but doubles the
tracing and lowering of each switch. Tracing and lowering the scan-path train step
(``lower_s`` of ``python -m hybrid_attn.bench --mode train --scan --flat_optimizer --threads
2 --batch 8``, a 2-core Xeon, jax 0.10.2) took 4.3-5.1 s for Twins-SVT-S (93 switches) and
3.6-3.9 s for CoAtNet-0 with ``jax.lax.platform_dependent``, and 3.3-3.5 and 2.8-2.9 s
choosing at trace time, the compiled step unchanged.

:func:`platform_dependent` therefore calls the form for ``jax.default_backend()``: the
platform ``jax.jit`` lowers for unless it is handed devices of another platform, in which
case the program is still correct, only without that platform's fast path. Inside
:func:`all_platforms` it defers to ``jax.lax.platform_dependent`` (for ``jax.export`` to
several platforms at once).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import lax

_ALL_PLATFORMS = contextvars.ContextVar("hybrid_attn_all_platforms", default=False)


def platform_dependent(*args: Any, cpu: Callable[..., Any],
                       default: Callable[..., Any]) -> Any:
    """``cpu(*args)`` when the default backend is the CPU, else ``default(*args)``; inside
    :func:`all_platforms`, ``jax.lax.platform_dependent(*args, cpu=cpu, default=default)``.
    Both forms must compute the same function."""
    if _ALL_PLATFORMS.get():
        return lax.platform_dependent(*args, cpu=cpu, default=default)
    return (cpu if jax.default_backend() == "cpu" else default)(*args)


@contextlib.contextmanager
def all_platforms() -> Iterator[None]:
    """Within this context the fast paths trace every platform's form and the lowering
    picks one (``jax.lax.platform_dependent``), as ``jax.export`` for several platforms
    needs. Trace inside the context (a function ``jax.jit`` has already traced keeps its
    trace)."""
    token = _ALL_PLATFORMS.set(True)
    try:
        yield
    finally:
        _ALL_PLATFORMS.reset(token)
