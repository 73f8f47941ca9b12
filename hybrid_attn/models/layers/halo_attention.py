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
less than one.

Strided (``stride=2``, the first block of a stage in timm's HaloNets; :class:`HaloBlocks`):
the queries are sub-sampled, the query of output pixel (i, j) is the projection of input
pixel (2i, 2j), each (b/2)^2 query block attends to the (b + 2h)^2 keys of the
full-resolution block it came from, and the relative logits index the query by its place
in the *sub-sampled* block (timm's ``PosEmbedRel`` on ``block_size_ds``), not in the image.
``qk_head_dim`` gives query/key heads narrower than the value heads (timm's ``dim_head``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_attn.models.layers.attention import Attention, Blocked
from hybrid_attn.models.layers.attention_kernels import BlockLayout
from hybrid_attn.models.layers.position import LogitTerm
from hybrid_attn.models.layers.relative_logits import RelativeLogits2D

Dtype = Any


@dataclasses.dataclass(frozen=True)
class HaloBlocks(Blocked):
    """The ``Blocked`` pattern with zero-padded keys and, for ``query_stride = s > 1``,
    queries sub-sampled by s inside each block (see the module docstring).

    The strided form reuses the unstrided kernel: each block's (b/s)^2 sub-sampled queries
    are placed at the top-left of a b x b block (the rest zero queries, whose outputs are
    dropped), where the kernel's position term indexes them exactly as timm does.
    """

    padding: str = "zero_kv"
    query_stride: int = 1

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout,
               position: LogitTerm | None, **kw) -> tuple[jax.Array, jax.Array | None]:
        s, n = self.query_stride, self.block
        if s == 1:
            return super().attend(q, k, v, layout, position, **kw)
        b, h, w, heads, d = q.shape
        nh, nw, bq = h // n, w // n, n // s
        blocks = q.reshape(b, nh, n, nw, n, heads, d)[:, :, ::s, :, ::s]
        pad = [(0, 0), (0, 0), (0, n - bq), (0, 0), (0, n - bq), (0, 0), (0, 0)]
        out, weights = super().attend(jnp.pad(blocks, pad).reshape(q.shape), k, v, layout,
                                      position, **kw)
        out = out.reshape(b, nh, n, nw, n, heads, -1)[:, :, :bq, :, :bq]
        out = out.reshape(b, nh * bq, nw * bq, heads, -1)
        if weights is not None:
            rows, cols = (np.arange(m * bq) // bq * n + np.arange(m * bq) % bq for m in (nh, nw))
            weights = weights[:, :, rows][:, :, :, cols]
        return out, weights


def HaloAttention(  # noqa: N802 -- a constructor, used like the module it returns
    features: int,
    num_heads: int = 8,
    block_size: int = 8,
    halo_size: int = 3,
    *,
    qk_head_dim: int | None = None,
    stride: int = 1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> Attention:
    """Halo attention with the paper's (and timm's) block 8 and halo 3 and timm's 8 heads;
    params ``qkv`` (bias-free, ``[3, heads, d]`` channels) and ``position/rel_height``,
    ``position/rel_width`` ``[2 (b + 2h) - 1, d]`` (timm's ``height_rel`` / ``width_rel``;
    fixed by b and h, so a new resolution needs no resizing)."""
    return Attention(
        features=features, num_heads=num_heads, qk_head_dim=qk_head_dim, qkv_bias=False,
        pattern=HaloBlocks(block_size, halo=halo_size, query_stride=stride),
        position=functools.partial(RelativeLogits2D, scale_query=False),
        dtype=dtype, param_dtype=param_dtype, name=name,
    )


class HaloBottleneckAttention(nn.Module):
    """A bottleneck's spatial op (timm's ``SelfAttnBlock`` + ``HaloAttn``): halo attention
    (the child ``attn``), strided by sub-sampling its queries, no pooling. Maps must be
    multiples of the block side (timm asserts the same)."""

    features: int
    strides: int = 1
    num_heads: int = 8
    qk_head_dim: int | None = None
    block_size: int = 8
    halo_size: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b = self.block_size
        if self.strides not in (1, 2) or b % self.strides:
            raise ValueError(f"halo attention strides must be 1 or 2 and divide the block "
                             f"side {b}, got {self.strides}")
        if x.ndim != 4 or x.shape[1] % b or x.shape[2] % b:
            raise ValueError(f"halo attention with {b}x{b} blocks needs a map whose sides are "
                             f"multiples of {b}, got {x.shape[1:-1]}; use an input size "
                             "that gives one")
        return HaloAttention(
            self.features, self.num_heads, b, self.halo_size, qk_head_dim=self.qk_head_dim,
            stride=self.strides, dtype=self.dtype, param_dtype=self.param_dtype, name="attn",
        )(x, train=train)
