"""Multi-head attention, written once and reused by every family.

Token maps are NHWC; heads are split as ``[..., tokens, heads, head_dim]``. Logits and
the softmax always run in float32, whatever the compute dtype.

Position terms are small separate modules passed to :class:`MultiHeadAttention` as
``position``. They are called as ``position(q, q_hw, kv_hw)`` with the *unscaled*
queries ``q`` of shape ``[B, Nq, heads, head_dim]`` and the (height, width) of the query
and key maps, and return an additive logit term broadcastable to ``[B, heads, Nq, Nk]``.
This covers CoAtNet's relative bias table (ignores ``q``), BoTNet's 2-D relative logits
(``q . r``) and absolute position logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PositionTerm = Callable[[jax.Array, tuple[int, int], tuple[int, int]], jax.Array]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """``softmax(q k^T + bias) v`` over the key axis.

    Args:
      q: ``[..., Nq, heads, d]`` queries, already scaled.
      k: ``[..., Nk, heads, d]`` keys.
      v: ``[..., Nk, heads, dv]`` values.
      bias: additive logits broadcastable to ``[..., heads, Nq, Nk]``.
      mask: boolean, broadcastable to ``[..., heads, Nq, Nk]``; True means "may attend".
        A query whose keys are all masked gets uniform weights (callers drop such rows).
      dropout_rate: dropout on the attention weights (needs ``dropout_rng``).

    Returns:
      ``[..., Nq, heads, dv]`` in the dtype of ``v``.
    """
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v)


class MultiHeadAttention(nn.Module):
    """Global multi-head attention over a feature map with an optional position term.

    Self-attention when called as ``attn(x)``: one fused ``qkv`` projection whose output
    channels are laid out ``[3, heads, head_dim]``. Cross-attention to a (for example
    sub-sampled) map when called as ``attn(x, kv)``: projections ``q`` and ``kv`` (the
    latter laid out ``[2, heads, head_dim]``); this is Twins' GSA.

    Attributes:
      num_heads: number of heads.
      head_dim: per-head query/key/value width.
      out_features: width of the output projection ``proj``; None for no projection
        (BoTNet and SASA have none, the output is ``heads * head_dim`` wide).
      qkv_bias: whether the q/k/v projections have a bias.
      position: optional position term, see the module docstring.
      attn_dropout: dropout on the attention weights (rng stream ``dropout``).
    """

    num_heads: int
    head_dim: int
    out_features: int | None = None
    qkv_bias: bool = True
    position: PositionTerm | None = None
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"MultiHeadAttention expects an NHWC map, got shape {x.shape}")
        b, h, w, _ = x.shape
        heads, d = self.num_heads, self.head_dim
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        if kv is None:
            qkv = dense(3 * heads * d, "qkv")(x).reshape(b, h * w, 3, heads, d)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            kv_hw = (h, w)
        else:
            if kv.ndim != 4 or kv.shape[0] != b:
                raise ValueError(
                    f"kv must be an NHWC map with batch {b}, got shape {kv.shape}"
                )
            kv_hw = kv.shape[1:3]
            q = dense(heads * d, "q")(x).reshape(b, h * w, heads, d)
            kv_ = dense(2 * heads * d, "kv")(kv).reshape(b, kv_hw[0] * kv_hw[1], 2, heads, d)
            k, v = kv_[:, :, 0], kv_[:, :, 1]
        bias = self.position(q, (h, w), kv_hw) if self.position is not None else None
        rng = self.make_rng("dropout") if train and self.attn_dropout > 0 else None
        out = dot_product_attention(
            q * jnp.asarray(d**-0.5, q.dtype), k, v, bias=bias,
            dropout_rate=self.attn_dropout if train else 0.0, dropout_rng=rng,
        )
        out = out.reshape(b, h, w, heads * d)
        if self.out_features is not None:
            out = nn.Dense(
                self.out_features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
            )(out)
        return out
