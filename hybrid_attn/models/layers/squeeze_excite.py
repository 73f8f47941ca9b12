"""Squeeze-and-excitation (Hu et al. 2018), shared by MBConv and SE-ResNet blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 ``reduce`` -> activation -> 1x1 ``expand`` -> sigmoid gate.

    Attributes:
      hidden_features: width of the bottleneck (callers derive it from their ratio, since
        papers disagree on whether the ratio applies to the block input or the expanded width).
      activation: activation between the two projections.
    """

    hidden_features: int
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = nn.Dense(self.hidden_features, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="reduce")(s)
        s = self.activation(s)
        s = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                     name="expand")(s)
        return x * nn.sigmoid(s).astype(x.dtype)
