"""Non-local block (Wang et al. 2018), the global-attention baseline BoTNet compares against.

Embedded-Gaussian form (their Eq. 3 with Sec. 3.2's theta/phi/g): one-head attention over
all positions with q/k/v 1x1 projections to ``channels / reduction`` (with bias), an output
1x1 projection back to ``channels``, then BatchNorm whose scale starts at zero so the
inserted block starts as the identity (their Sec. 4.1), and a residual connection.
Logits are scaled by ``1/sqrt(d)`` as in timm's ``NonLocalAttn`` (the paper's
``f = exp(theta . phi)`` has no scale; the scaling keeps the softmax from saturating).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.attention import Attention
from hybrid_attn.models.layers.norm import batch_norm

Dtype = Any


class NonLocalBlock(nn.Module):
    """``x + BN(W softmax(theta(x) phi(x)^T / sqrt(d)) g(x))`` over all positions of x.

    Attributes:
      reduction: inner width is ``channels // reduction`` (2 in the paper).
    """

    reduction: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        channels = x.shape[-1]
        y = Attention(
            features=max(1, channels // self.reduction), num_heads=1, out_features=channels,
            dtype=self.dtype, param_dtype=self.param_dtype, name="attn",
        )(x, train=train)
        y = batch_norm(train, self.dtype, self.param_dtype, "bn",
                       scale_init=nn.initializers.zeros)(y)
        return x + y
