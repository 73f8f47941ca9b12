"""Efficient channel attention (ECA; Wang et al. 2020, "ECA-Net"), as timm's ``EcaModule``.

Squeeze-and-excitation without the bottleneck: the globally pooled channel vector is
filtered by one 1-D convolution across channels (kernel size ``k`` from the width, Eq. 12:
the odd number nearest ``|log2(C) + 1| / 2``, at least 3, as timm rounds it), no bias,
then a sigmoid gates the channels.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA's adaptive kernel size for ``channels`` (timm's rounding: odd, >= 3)."""
    t = int(abs(math.log2(channels) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(nn.Module):
    """``x * sigmoid(conv1d(mean_hw(x)))``; the conv is ``conv`` with a ``[k, 1, 1]``
    kernel and zero padding ``k // 2`` at both ends of the channel axis."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = eca_kernel_size(x.shape[-1])
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))[..., None].astype(self.dtype)
        s = nn.Conv(1, (k,), padding=[(k // 2, k // 2)], use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(s)
        return x * nn.sigmoid(s[..., 0])[:, None, None, :].astype(x.dtype)
