"""SASA's spatially-aware attention stem (Ramachandran et al. 2019, Sec. 3.2 and appendix).

Single RGB pixels are uninformative and strongly correlated, so plain attention makes a
poor stem. The paper keeps attention but gives the value projection a notion of where a
pixel sits inside its neighbourhood: the value of pixel ab is

    v_ab = (sum_m p(a, b, m) W_V^m) x_ab,
    p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu^m),

a convex combination of ``num_mixtures`` value matrices ``W_V^m`` whose weights depend
only on the (row, column) position ``(a, b)`` of the pixel inside its pooling window
(``emb_row``, ``emb_col``: window-aligned embeddings; ``nu^m``: one embedding per mixture
component). The factors ``p`` are shared by all heads. Attention runs inside each
non-overlapping ``window x window`` block ("the attention receptive field aligns with the
max pooling window"), multi-head, with scaled dot-product logits ``q . k / sqrt(d)`` and
no relative logits (the position information enters through the values), then BatchNorm
and ``window x window`` max pooling with stride ``window``: a 224 image becomes 56x56, as
after the convolutional stem. There is no activation between BatchNorm and pooling: the
paper names only those two (the conv stem's ReLU has no counterpart).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.local_attention import blocked_attention
from hybrid_attn.models.layers.norm import batch_norm

Dtype = Any


class MixtureValues(nn.Module):
    """The position-dependent value projection ``v_ab = (sum_m p(a, b, m) W_V^m) x_ab``.

    Param ``kernel [num_mixtures, C_in, features]`` holds the ``W_V^m`` (named ``kernel``
    like every projection matrix, so weight decay treats it as one).
    """

    features: int
    num_mixtures: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, blocks: jax.Array, p: jax.Array) -> jax.Array:
        """``blocks [B, H/s, s, W/s, s, C]`` and mixture weights ``p [s, s, m]`` (float32)
        -> values ``[B, H/s, s, W/s, s, features]``."""
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            (self.num_mixtures, blocks.shape[-1], self.features), self.param_dtype,
        )
        w_v = jnp.einsum("abm,mcf->abcf", p, kernel.astype(jnp.float32)).astype(self.dtype)
        return jnp.einsum("nyaxbc,abcf->nyaxbf", blocks.astype(self.dtype), w_v)


class AttentionStem(nn.Module):
    """Spatially-aware attention in ``window``-sized blocks -> BatchNorm -> max pool.

    Params: ``qk`` (bias-free Dense laid out ``[2, heads, head_dim]``), ``value/kernel``
    ``[num_mixtures, C_in, features]`` (the ``W_V^m``, :class:`MixtureValues`),
    ``emb_row`` / ``emb_col`` ``[window, embed_dim]``, ``mixture`` ``[embed_dim,
    num_mixtures]`` (the ``nu^m``), and ``norm`` (BatchNorm).

    Attributes:
      features: output width (64, the ResNet stem width).
      num_heads: attention heads (the paper uses 4).
      window: attention block and max-pool size/stride (the paper uses 4).
      num_mixtures: value matrices mixed per position (4; the paper does not state it,
        4 is the value used by the common public re-implementation).
      embed_dim: width of the row/column/mixture embeddings (not stated in the paper).
    """

    features: int = 64
    num_heads: int = 4
    window: int = 4
    num_mixtures: int = 4
    embed_dim: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        s, heads = self.window, self.num_heads
        if x.ndim != 4 or x.shape[1] % s or x.shape[2] % s:
            raise ValueError(
                f"AttentionStem expects NHWC images whose height and width are multiples of "
                f"its window {s}; got shape {x.shape}"
            )
        if self.features % heads:
            raise ValueError(f"features ({self.features}) must be divisible by {heads} heads")
        b, h, w, c = x.shape
        d = self.features // heads
        qk = nn.Dense(
            2 * self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            name="qk",
        )(x).reshape(b, h, w, 2, heads, d)

        emb_row, emb_col = (
            self.param(name, nn.initializers.normal(1.0), (s, self.embed_dim), self.param_dtype)
            for name in ("emb_row", "emb_col")
        )
        nu = self.param("mixture", nn.initializers.normal(self.embed_dim**-0.5),
                        (self.embed_dim, self.num_mixtures), self.param_dtype)
        logits = (emb_row[:, None] + emb_col[None, :]) @ nu  # [s, s, m]
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        v = MixtureValues(
            self.features, self.num_mixtures, dtype=self.dtype, param_dtype=self.param_dtype,
            name="value",
        )(x.reshape(b, h // s, s, w // s, s, c), p).reshape(b, h, w, heads, d)

        y = blocked_attention(qk[..., 0, :, :], qk[..., 1, :, :], v, block=(s, s))
        y = batch_norm(train, self.dtype, self.param_dtype, "norm")(
            y.reshape(b, h, w, self.features))
        return nn.max_pool(y, (s, s), (s, s))
