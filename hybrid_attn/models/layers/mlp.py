"""Transformer feed-forward block, shared by CoAtNet and Twins."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.activation import gelu
from hybrid_attn.models.layers.dense import Dense

Dtype = Any


class Mlp(nn.Module):
    """``fc1`` -> exact (erf) GELU -> dropout -> ``fc2`` -> dropout, on the last axis.

    The exact GELU matches the published PyTorch implementations (``nn.GELU()``, computed
    with ``erf`` as they do: :mod:`hybrid_attn.models.layers.activation`).
    """

    hidden_features: int
    out_features: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        out = self.out_features or x.shape[-1]
        x = Dense(self.hidden_features, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(x)
        x = gelu(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Dense(out, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)
