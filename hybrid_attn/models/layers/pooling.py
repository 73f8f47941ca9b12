"""Downsampling pools: 2x2 average pooling (strided attention, MBConv shortcuts) and the
3x3 stride-2 max pool (the ResNet stem, timm's ``max`` downsampling).

XLA:CPU computes a max pool's gradient slowly: it rewrites the select-and-scatter as a
variadic reduce-window over the map and four index maps, then a scatter (about 80 ms of
ResNet-50's 1.35-s train step at batch 8, 2 threads, 224x224, float32). :func:`max_pool`
therefore computes the gradient on CPU as elementwise passes over the window's strided
slices, each window's cotangent going to its first maximal position in row-major order, as
XLA's select-and-scatter (with ``>=``) sends it: 60.2 -> 10.7 ms forward and backward on
8x112x112x64. A forward pass that is not differentiated stays XLA's reduce-window (3.9 ms
there, 5.1 ms by slices), and other backends keep ``nn.max_pool``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hybrid_attn.models.layers.platform import platform_dependent

Pads = tuple[tuple[int, int], tuple[int, int]]


def _taps(xp: jax.Array, window: Sequence[int], strides: Sequence[int], out: Sequence[int]):
    """(offset, strided slice of the padded map ``xp``) per window position, row-major."""
    b, c = xp.shape[0], xp.shape[-1]
    for i, j in itertools.product(range(window[0]), range(window[1])):
        end = (b, i + (out[0] - 1) * strides[0] + 1, j + (out[1] - 1) * strides[1] + 1, c)
        yield (i, j), lax.slice(xp, (0, i, j, 0), end, (1, *strides, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_sliced(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                     pads: Pads) -> jax.Array:
    """``nn.max_pool`` when not differentiated (XLA's reduce-window is the faster forward
    alone); under differentiation the maximum of the strided slices, fused with the
    gradient's passes over the same slices."""
    return nn.max_pool(x, window, strides, padding=pads)


def _padded_min(x: jax.Array, pads: Pads) -> jax.Array:
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)


def _max_pool_sliced_fwd(x, window, strides, pads):
    out = tuple((n + lo + hi - k) // s + 1
                for n, k, s, (lo, hi) in zip(x.shape[1:3], window, strides, pads))
    taps = _taps(_padded_min(x, pads), window, strides, out)
    y = functools.reduce(jnp.maximum, (t for _, t in taps))
    return y, (x, y)


def _max_pool_sliced_bwd(window, strides, pads, residuals, dy):
    x, y = residuals
    xp = _padded_min(x, pads)
    out = y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for (i, j), tap in _taps(xp, window, strides, out):
        first = (tap == y) & ~taken  # the first maximal position of each window wins
        taken = taken | first
        spread = [(0, 0, 0)] + [
            (o, n - o - (m - 1) * s - 1, s - 1)
            for o, n, m, s in zip((i, j), xp.shape[1:3], out, strides)] + [(0, 0, 0)]
        dxp = dxp + lax.pad(jnp.where(first, dy, 0), jnp.zeros((), dy.dtype), spread)
    (top, _), (left, _) = pads
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool_sliced.defvjp(_max_pool_sliced_fwd, _max_pool_sliced_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             pads: Pads = ((0, 0), (0, 0)), impl: str = "auto") -> jax.Array:
    """Max pooling of NHWC ``x`` with explicit ``(low, high)`` ``pads`` (padding never wins),
    equal to ``nn.max_pool`` in value and gradient. ``impl="auto"`` computes the gradient
    by strided slices on CPU and as ``nn.max_pool`` does elsewhere; ``"sliced"`` and
    ``"native"`` force one form."""
    window, strides = tuple(window), tuple(strides)
    pads = tuple(tuple(p) for p in pads)
    if x.ndim != 4 or len(window) != 2 or len(strides) != 2 or len(pads) != 2:
        raise ValueError("max_pool expects x [B, H, W, C], a 2-D window and strides and two "
                         f"(low, high) pads, got x {x.shape}, window {window}, strides "
                         f"{strides}, pads {pads}")
    native = lambda x: nn.max_pool(x, window, strides, padding=pads)  # noqa: E731
    sliced = lambda x: _max_pool_sliced(x, window, strides, pads)  # noqa: E731
    forms = {"native": native, "sliced": sliced}
    if impl in forms:
        return forms[impl](x)
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'sliced' or 'native', got {impl!r}")
    return platform_dependent(x, cpu=sliced, default=native)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 over an NHWC map, in float32, cast back to x's dtype.

    An odd side rounds up (ceil mode, padded cells excluded from the average), matching a
    strided 1x1 shortcut convolution; on even maps this is the plain 2x2 pool (timm's
    ``avg2`` downsampling, BoTNet's and SASA's pooling after strided attention).
    """
    pad = [(0, n % 2) for n in x.shape[1:3]]
    y = nn.avg_pool(x.astype(jnp.float32), (2, 2), (2, 2), padding=pad, count_include_pad=False)
    return y.astype(x.dtype)


def max_pool3(x: jax.Array) -> jax.Array:
    """3x3 max pooling with stride 2 and one pixel of padding on each side (padding never
    wins), halving an even map: torch's ``MaxPool2d(3, 2, padding=1)``."""
    return max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
