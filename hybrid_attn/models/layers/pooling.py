"""Downsampling pools: 2x2 average pooling (strided attention, MBConv shortcuts) and the
3x3 stride-2 max pool (timm's ``max`` downsampling)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
