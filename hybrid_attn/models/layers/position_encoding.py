"""Conditional position encoding (Chu et al. 2021, "Conditional Positional Encodings for
Vision Transformers"), as used by Twins."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.conv import DepthwiseConv

Dtype = Any


class PositionEncodingGenerator(nn.Module):
    """PEG: ``x + DWConv3x3(x)`` on an NHWC map (CPVT Eq. 4; Twins Sec. 3.1).

    The position signal comes from the zero padding at the borders of a depthwise conv, so
    it is defined for any input size and there is no table to resize when the resolution
    changes. Parameters: ``proj`` (kernel ``[k, k, 1, C]`` and bias).
    """

    kernel_size: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"PositionEncodingGenerator expects an NHWC map, got {x.shape}")
        k = self.kernel_size
        pos = DepthwiseConv((k, k), padding=k // 2, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="proj")(x)
        return x + pos
