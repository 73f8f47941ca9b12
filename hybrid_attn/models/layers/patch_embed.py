"""Non-overlapping patch embedding (PVT / Twins stage entry)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.conv import Conv
from hybrid_attn.models.layers.norm import LayerNorm

Dtype = Any


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = ``patch_size`` (``proj``), then LayerNorm (``norm``).

    Twins (Chu et al. 2021, Sec. 3) opens every stage with this: patch size 4 for the
    first stage and 2 for the others. Like the published PyTorch conv, rows/columns that do
    not fill a whole patch are dropped (output size ``floor(H / p) x floor(W / p)``).

    Attributes:
      features: embedding width.
      patch_size: kernel size and stride.
      norm_eps: LayerNorm epsilon (1e-5 in the published code, PyTorch's default).
    """

    features: int
    patch_size: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        if x.ndim != 4:
            raise ValueError(f"PatchEmbed expects an NHWC map, got shape {x.shape}")
        if x.shape[1] < p or x.shape[2] < p:
            raise ValueError(
                f"PatchEmbed with patch size {p} needs a map of at least {p}x{p}, "
                f"got {x.shape[1]}x{x.shape[2]}"
            )
        x = Conv(self.features, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                 param_dtype=self.param_dtype, name="proj")(x)
        return LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(x)
