"""HaloNet's blocked local self-attention (Vaswani et al. 2021), composed from the parts.

The map is cut into b x b query blocks; each attends to its block grown by a halo of h
pixels on every side, a (b + 2h) x (b + 2h) key block, with 2-D relative logits
``q . r_h[row offset] + q . r_w[column offset]`` whose tables have ``2 (b + 2h) - 1`` rows
of the head dimension, shared by the heads (:class:`RelativeLogits2D` on the block's key
grid). The math follows timm's ``HaloAttn`` (the published reference; there is no official
code), so its weights load: logits ``q . k / sqrt(d) + q . r`` with the position term on
the *unscaled* query (timm's default ``scale_pos_embed=False``), q/k/v projections without
bias, no output projection.

At the borders timm does **not** mask: it pads the projected keys and values with zeros,
so the halo's out-of-image keys are zero vectors that take part in the softmax (content
logit 0 plus their position logit) and contribute nothing to the output. We do the same
(``Blocked(padding="zero_kv")``); a border pixel's weights on real keys therefore sum to
less than one. timm's strided variant (query blocks sub-sampled for stride 2) is not
covered: use stride 1 and pool.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp

from hybrid_attn.models.layers.attention import Attention, Blocked
from hybrid_attn.models.layers.relative_logits import RelativeLogits2D

Dtype = Any


def HaloAttention(  # noqa: N802 -- a constructor, used like the module it returns
    features: int,
    num_heads: int = 8,
    block_size: int = 8,
    halo_size: int = 3,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> Attention:
    """Halo attention with the paper's (and timm's) block 8 and halo 3 and timm's 8 heads;
    params ``qkv`` (bias-free, ``[3, heads, d]`` channels) and ``position/rel_height``,
    ``position/rel_width`` ``[2 (b + 2h) - 1, d]`` (timm's ``height_rel`` / ``width_rel``;
    fixed by b and h, so a new resolution needs no resizing)."""
    return Attention(
        features=features, num_heads=num_heads, qkv_bias=False,
        pattern=Blocked(block_size, halo=halo_size, padding="zero_kv"),
        position=functools.partial(RelativeLogits2D, scale_query=False),
        dtype=dtype, param_dtype=param_dtype, name=name,
    )
