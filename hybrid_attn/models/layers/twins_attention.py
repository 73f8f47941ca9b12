"""Twins' two spatial attentions (Chu et al. 2021, Sec. 3.2, Eq. 1).

* Global sub-sampled attention (GSA): every token queries keys/values taken from a
  sub-sampled copy of the map (conv with kernel = stride = ``sr``, then LayerNorm). It is
  the shared :class:`MultiHeadAttention` in cross-attention form ``attn(x, kv)``.
* Locally-grouped attention (LSA): self-attention inside non-overlapping windows, the
  shared block-wise local attention (:func:`blocked_attention` with no halo) that also
  serves SASA, which masks the padded border.

Both take and return NHWC maps; parameter names follow the published code
(``q``/``kv``/``proj``/``sr``/``norm`` and ``qkv``/``proj``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.attention import MultiHeadAttention
from hybrid_attn.models.layers.local_attention import blocked_attention

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
        qkv_dense = nn.Dense(3 * c, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")
        if self.mask_padding:
            # blocked_attention pads to whole windows and masks the padded keys.
            block = (min(ws, h), min(ws, w))
            qkv = qkv_dense(x)
        else:
            block = (ws, ws)
            qkv = qkv_dense(jnp.pad(x, ((0, 0), (0, (-h) % ws), (0, (-w) % ws), (0, 0))))
        qkv = qkv.reshape(*qkv.shape[:3], 3, heads, d)
        rng = self.make_rng("dropout") if train and self.attn_dropout > 0 else None
        out = blocked_attention(
            qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], block=block,
            dropout_rate=self.attn_dropout if train else 0.0, dropout_rng=rng,
        )
        out = out[:, :h, :w].reshape(b, h, w, c)
        return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
