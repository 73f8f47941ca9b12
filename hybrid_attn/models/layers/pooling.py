"""2x2 average pooling, the downsampling of strided attention and MBConv shortcuts."""

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
