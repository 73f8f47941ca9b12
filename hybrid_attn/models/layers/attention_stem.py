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

from hybrid_attn.models.layers.attention import split_heads
from hybrid_attn.models.layers.attention_kernels import BlockLayout, blocked_attention
from hybrid_attn.models.layers.dense import Dense
from hybrid_attn.models.layers.norm import batch_norm

Dtype = Any


class MixturePositions(nn.Module):
    """The mixture weights ``p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu^m)``, float32
    ``[window, window, num_mixtures]``: the stem's position tables (``emb_row``, ``emb_col``
    ``[window, embed_dim]``, ``mixture`` ``[embed_dim, num_mixtures]``, the ``nu^m``)."""

    window: int
    num_mixtures: int
    embed_dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        s, e = self.window, self.embed_dim
        emb_row, emb_col = (self.param(name, nn.initializers.normal(1.0), (s, e), self.param_dtype)
                            for name in ("emb_row", "emb_col"))
        nu = self.param("mixture", nn.initializers.normal(e**-0.5), (e, self.num_mixtures),
                        self.param_dtype)
        logits = (emb_row[:, None] + emb_col[None, :]).astype(jnp.float32) @ nu
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class AttentionStem(nn.Module):
    """Spatially-aware attention in ``window``-sized blocks -> BatchNorm -> max pool.

    Params: ``qk`` (bias-free Dense laid out ``[2, heads, head_dim]``), ``value``
    ``[num_mixtures, C_in, features]`` (the ``W_V^m``), ``position`` (the mixture weights'
    tables, :class:`MixturePositions`), and ``norm`` (BatchNorm).

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
        s = self.window
        if x.ndim != 4 or x.shape[1] % s or x.shape[2] % s:
            raise ValueError(
                f"AttentionStem expects NHWC images whose height and width are multiples of "
                f"its window {s}; got shape {x.shape}"
            )
        heads, d = split_heads(self.features, self.num_heads, None)
        b, h, w, c = x.shape
        qk = Dense(
            2 * self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            name="qk",
        )(x).reshape(b, h, w, 2, heads, d)
        p = MixturePositions(s, self.num_mixtures, self.embed_dim, self.param_dtype,
                             name="position")()
        kernel = self.param(
            "value", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            (self.num_mixtures, c, self.features), self.param_dtype,
        )
        w_v = jnp.einsum("abm,mcf->abcf", p, kernel.astype(jnp.float32)).astype(self.dtype)
        v = jnp.einsum("nyaxbc,abcf->nyaxbf", x.reshape(b, h // s, s, w // s, s, c).astype(
            self.dtype), w_v).reshape(b, h, w, heads, d)
        y, _ = blocked_attention(qk[..., 0, :, :], qk[..., 1, :, :], v,
                                 BlockLayout.make((h, w), (s, s)))
        y = batch_norm(train, self.dtype, self.param_dtype, "norm")(
            y.reshape(b, h, w, self.features))
        return nn.max_pool(y, (s, s), (s, s))
