"""LayerScale (Touvron et al. 2021, CaiT Eq. 5): a learned per-channel scale on a residual
branch, initialised small so a deep network starts close to the identity."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class LayerScale(nn.Module):
    """``x * scale`` over the last axis; ``scale`` starts at ``init_value`` everywhere."""

    init_value: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],),
                           self.param_dtype)
        return x * scale.astype(x.dtype)
