"""Twins' two spatial attentions (Chu et al. 2021, Sec. 3.2, Eq. 1).

* Global sub-sampled attention (GSA): every token queries keys/values taken from a
  sub-sampled copy of the map (conv with kernel = stride = ``sr``, then LayerNorm). It is
  the shared :class:`MultiHeadAttention` in cross-attention form ``attn(x, kv)``.
* Locally-grouped attention (LSA): self-attention inside non-overlapping windows, on
  :func:`dot_product_attention` with a mask for the padded border.

Both take and return NHWC maps; parameter names follow the published code
(``q``/``kv``/``proj``/``sr``/``norm`` and ``qkv``/``proj``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.attention import MultiHeadAttention, dot_product_attention

Dtype = Any


def _head_dim(channels: int, num_heads: int) -> int:
    if channels % num_heads:
        raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
    return channels // num_heads


class GlobalSubsampledAttention(nn.Module):
    """GSA: queries from all ``H x W`` tokens, keys/values from an ``sr``-times smaller map.

    ``sr_ratio = 1`` is plain global self-attention (no sub-sampling conv, no norm), as in
    the last Twins stage. The attention projections live directly in this module's scope
    (``q``, ``kv`` laid out ``[2, heads, d]``, ``proj``), next to ``sr`` and ``norm``.

    Attributes:
      num_heads: attention heads; the head width is ``C / num_heads``.
      sr_ratio: sub-sampling ratio (kernel and stride of ``sr``).
      norm_eps: epsilon of the LayerNorm after ``sr`` (1e-5 in the published code).
      attn_dropout: dropout on the attention weights.
    """

    num_heads: int
    sr_ratio: int = 1
    norm_eps: float = 1e-5
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"GlobalSubsampledAttention expects an NHWC map, got {x.shape}")
        _, h, w, c = x.shape
        kv = x
        r = self.sr_ratio
        if r > 1:
            if h < r or w < r:
                raise ValueError(
                    f"GSA with sr_ratio={r} needs a feature map of at least {r}x{r}, "
                    f"got {h}x{w}; use a larger input"
                )
            kv = nn.Conv(c, (r, r), strides=(r, r), padding="VALID", dtype=self.dtype,
                         param_dtype=self.param_dtype, name="sr")(x)
            kv = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="norm")(kv)
        attn = MultiHeadAttention(
            num_heads=self.num_heads, head_dim=_head_dim(c, self.num_heads), out_features=c,
            qkv_bias=True, attn_dropout=self.attn_dropout, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        nn.share_scope(self, attn)
        return attn(x, kv, train=train)


def _to_windows(x: jax.Array, wh: int, ww: int) -> jax.Array:
    """``[B, Hp, Wp, ...]`` -> ``[B, windows, wh * ww, ...]`` (row-major window order)."""
    b, hp, wp, *rest = x.shape
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, *rest)
    x = jnp.moveaxis(x, 3, 2)
    return x.reshape(b, (hp // wh) * (wp // ww), wh * ww, *rest)


def _from_windows(x: jax.Array, hp: int, wp: int, wh: int, ww: int) -> jax.Array:
    """Inverse of :func:`_to_windows`."""
    b, _, _, *rest = x.shape
    x = x.reshape(b, hp // wh, wp // ww, wh, ww, *rest)
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape(b, hp, wp, *rest)


class LocallyGroupedAttention(nn.Module):
    """LSA: multi-head self-attention inside non-overlapping ``window_size`` windows.

    A map not divisible by the window is zero-padded at the bottom/right. With
    ``mask_padding=True`` (default) the padded keys are masked out, so every output equals
    attention over the real tokens of its window, and a side shorter than the window uses
    one window of that side's length (identical result, less work). With
    ``mask_padding=False`` the published code is reproduced exactly: the *input tokens* are
    padded with zeros before the ``qkv`` projection, so padded keys carry the projection bias
    and take part in the softmax (Twins' "forward_padding"; needed for weight parity on
    sizes not divisible by the window).

    Attributes:
      num_heads: attention heads; the head width is ``C / num_heads``.
      window_size: window side (7 in Twins-SVT).
      mask_padding: mask padded keys (True) or reproduce the published padding (False).
      attn_dropout: dropout on the attention weights.
    """

    num_heads: int
    window_size: int = 7
    mask_padding: bool = True
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"LocallyGroupedAttention expects an NHWC map, got {x.shape}")
        b, h, w, c = x.shape
        heads, d = self.num_heads, _head_dim(c, self.num_heads)
        ws = self.window_size
        wh, ww = (min(ws, h), min(ws, w)) if self.mask_padding else (ws, ws)
        pad = ((0, 0), (0, (-h) % wh), (0, (-w) % ww), (0, 0))
        hp, wp = h + pad[1][1], w + pad[2][1]
        qkv_dense = nn.Dense(3 * c, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")
        if self.mask_padding:
            qkv = jnp.pad(qkv_dense(x), pad)
        else:
            qkv = qkv_dense(jnp.pad(x, pad))
        qkv = _to_windows(qkv, wh, ww).reshape(b, -1, wh * ww, 3, heads, d)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        mask = None
        if self.mask_padding and (hp, wp) != (h, w):
            valid = (jnp.arange(hp) < h)[:, None] & (jnp.arange(wp) < w)[None, :]
            mask = _to_windows(valid[None], wh, ww)[:, :, None, None, :]
        rng = self.make_rng("dropout") if train and self.attn_dropout > 0 else None
        out = dot_product_attention(
            q * jnp.asarray(d**-0.5, q.dtype), k, v, mask=mask,
            dropout_rate=self.attn_dropout if train else 0.0, dropout_rng=rng,
        )
        out = _from_windows(out.reshape(b, -1, wh * ww, c), hp, wp, wh, ww)[:, :h, :w]
        return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
