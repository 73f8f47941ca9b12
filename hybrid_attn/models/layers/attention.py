"""Multi-head attention, written once: every family's attention is this module.

:class:`Attention` owns the projections, the head split and the output projection, and
is given two parts:

* a **pattern** -- which keys each query sees -- :class:`Global` (all positions),
  :class:`Subsampled` (keys and values from a strided conv + LayerNorm of the map, Twins'
  GSA) or :class:`Blocked` (query blocks against their block plus a halo, optionally a
  k x k window per query: Twins' LSA, SASA, HaloNet, MaxViT). Patterns are small frozen
  dataclasses; their kernels are the pure functions of
  :mod:`~hybrid_attn.models.layers.attention_kernels`.
* a **position term** -- a factory of a
  :class:`~hybrid_attn.models.layers.position.PositionTable`, always created as the
  child ``position`` (so its tables sit at ``.../attn/position/<table>``), called with the
  pattern's :class:`~hybrid_attn.models.layers.position.Grid` and returning the pure logit
  term the kernel adds.

Token maps are NHWC; heads are split as ``[..., heads, head_dim]`` with the fused ``qkv``
projection's channels laid out ``[3, heads, head_dim]`` (``q`` and ``kv`` ``[2, heads,
head_dim]`` for sub-sampled keys). Logits and the softmax run in float32 whatever the
compute dtype. When the ``attention`` collection is mutable (and not at init) the module
sows an :class:`AttentionMap` of its softmax weights; see :mod:`hybrid_attn.models.capture`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from hybrid_attn.models.layers.attention_kernels import (
    BlockLayout,
    block_side,
    blocked_attention,
    blocked_attention_packed,
    dense_block_weights,
    dot_product_attention,
    fused_dot_product_attention,
    unpack_planes,
)
from hybrid_attn.models.layers.conv import Conv
from hybrid_attn.models.layers.dense import Dense
from hybrid_attn.models.layers.norm import LayerNorm
from hybrid_attn.models.layers.pooling import avg_pool2
from hybrid_attn.models.layers.position import Grid, LogitTerm, PositionTable

Dtype = Any
PositionFactory = Callable[..., PositionTable]


def split_heads(features: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of a ``features``-wide projection from exactly one of them;
    a ValueError when they do not divide it."""
    if (num_heads is None) == (head_dim is None):
        raise ValueError(f"give exactly one of num_heads ({num_heads}) and head_dim ({head_dim})")
    per = num_heads if num_heads is not None else head_dim
    what = "heads" if num_heads is not None else "channels per head"
    if per < 1 or features % per:
        raise ValueError(f"{features} channels cannot be split into {what} of {per}")
    return (per, features // per) if num_heads is not None else (features // per, per)


class AttentionMap(struct.PyTreeNode):
    """One attention layer's softmax weights, as sown into the ``attention`` collection.

    ``weights`` is float32 ``[B, heads, Hq, Wq, Hk, Wk]``: the weight of every query on
    every key of the key grid (keys that a query does not see, or that lie outside the
    image, get exactly 0). Key ``(a, b)`` summarises image pixels from ``(a * sh, b * sw)``
    on for ``key_stride = (sh, sw)`` (sub-sampled keys).
    """

    weights: jax.Array
    path: str = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False)
    query_hw: tuple[int, int] = struct.field(pytree_node=False)
    key_hw: tuple[int, int] = struct.field(pytree_node=False)
    key_stride: tuple[int, int] = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Global:
    """Every query attends to every key (self-attention with one fused ``qkv``)."""

    kind: ClassVar[str] = "global"
    key_stride: ClassVar[tuple[int, int]] = (1, 1)

    def inputs(self, module: Attention, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The maps the queries and (if not the same, else None) the keys come from."""
        return x, None

    def layout(self, q_hw: tuple[int, int], k_hw: tuple[int, int]) -> Grid:
        return Grid(q_hw, k_hw, k_stride=self.key_stride)

    def grid(self, layout: Grid) -> Grid:
        return layout

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, layout: Grid,
               position: LogitTerm | None, **kw) -> tuple[jax.Array, jax.Array]:
        """``[B, Hq, Wq, heads, dv]`` outputs and ``[B, heads, Hq, Wq, Hk, Wk]`` weights
        (None unless ``return_weights``: without weights or dropout the fused kernel runs)."""
        b, *q_hw, heads, d = q.shape
        flat = lambda t: t.reshape(b, -1, *t.shape[3:])
        bias = None if position is None else position(flat(q))
        rate, rng = kw.get("dropout_rate", 0.0), kw.get("dropout_rng")
        if not kw.get("return_weights") and rate == 0.0:
            # jax.nn.dot_product_attention: cuDNN's fused kernel on GPU (bf16), XLA elsewhere.
            out = fused_dot_product_attention(flat(q), flat(k), flat(v), bias=bias,
                                              scale=d**-0.5)
            return out.reshape(*q.shape[:-1], -1), None
        scale = jnp.asarray(d**-0.5, q.dtype)
        out, weights = dot_product_attention(flat(q) * scale, flat(k), flat(v), bias=bias,
                                             dropout_rate=rate, dropout_rng=rng)
        return out.reshape(*q.shape[:-1], -1), weights.reshape(b, heads, *q_hw, *k.shape[1:3])


@dataclasses.dataclass(frozen=True)
class Subsampled(Global):
    """Twins' global sub-sampled attention: keys/values from the map sub-sampled by a conv
    of kernel = stride = ``ratio`` (``sr``) and a LayerNorm (``norm``); separate ``q`` and
    ``kv`` projections. ``ratio = 1`` is global attention with those projection names."""

    ratio: int = 1
    norm_eps: float = 1e-5
    kind: ClassVar[str] = "subsampled"

    @property
    def key_stride(self) -> tuple[int, int]:  # type: ignore[override]
        return (self.ratio, self.ratio)

    def inputs(self, module: Attention, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        r, (h, w, c) = self.ratio, x.shape[1:]
        if r == 1:
            return x, x
        if h < r or w < r:
            raise ValueError(f"GSA with sr_ratio={r} needs a feature map of at least {r}x{r}, "
                             f"got {h}x{w}; use a larger input")
        kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
        kv = Conv(c, (r, r), strides=(r, r), padding="VALID", name="sr", **kw)(x)
        return x, LayerNorm(epsilon=self.norm_eps, name="norm", **kw)(kv)


@dataclasses.dataclass(frozen=True)
class Blocked:
    """Query blocks of ``block`` x ``block`` against their block grown by ``halo``.

    Attributes:
      block: query block side. With a ``window`` it is only a compute knob (the largest
        side tried, :func:`~hybrid_attn.models.layers.attention_kernels.block_side`).
      halo: extra key rows/columns on each side of a block.
      window: if set (odd), each query attends only to the keys within ``window // 2``
        rows and columns of itself (SASA's k x k neighbourhoods).
      padding: what lies outside the image: ``"mask"`` -- nothing, those keys are masked
        out and a block larger than the map shrinks to it; ``"zero_kv"`` -- zero keys and
        values that take part in the softmax (timm's ``HaloAttn``); ``"zero_tokens"`` --
        the map is padded with zero tokens to whole blocks *before* the projections, so
        padded keys carry the projection bias (Twins' published LSA).
      row_chunk: block rows per sequential step (memory knob, never changes the result).
      batch_chunk: with ``row_chunk``, images per sequential step too (memory knob).
    """

    block: int
    halo: int = 0
    window: int | None = None
    padding: str = "mask"
    row_chunk: int | None = None
    batch_chunk: int | None = None
    kind: ClassVar[str] = "blocked"
    key_stride: ClassVar[tuple[int, int]] = (1, 1)
    PADDINGS: ClassVar[tuple[str, ...]] = ("mask", "zero_kv", "zero_tokens")

    def inputs(self, module: Attention, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        if self.padding not in self.PADDINGS:
            raise ValueError(f"padding must be one of {self.PADDINGS}, got {self.padding!r}")
        if self.padding == "zero_tokens":
            pad = [(0, 0)] + [(0, -n % self.block) for n in x.shape[1:3]] + [(0, 0)]
            x = jnp.pad(x, pad)
        return x, None

    def layout(self, q_hw: tuple[int, int], k_hw: tuple[int, int]) -> BlockLayout:
        if self.window is not None:
            block = tuple(block_side(n, self.block, self.window) for n in q_hw)
        elif self.padding == "mask":
            block = tuple(min(n, self.block) for n in q_hw)
        else:
            block = (self.block, self.block)
        window = None if self.window is None else (self.window, self.window)
        return BlockLayout.make(q_hw, block, (self.halo, self.halo), window,
                                mask_outside=self.padding == "mask")

    def grid(self, layout: BlockLayout) -> Grid:
        return layout.grid

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout,
               position: LogitTerm | None, **kw) -> tuple[jax.Array, jax.Array | None]:
        capture = kw.pop("return_weights", False)
        out, weights = blocked_attention(q, k, v, layout, position=position,
                                         row_chunk=self.row_chunk,
                                         batch_chunk=self.batch_chunk,
                                         return_weights=capture, **kw)
        return out, None if weights is None else dense_block_weights(weights, layout)

    def attend_packed(self, qkv: jax.Array, layout: BlockLayout, position: LogitTerm | None,
                      **kw) -> tuple[jax.Array, jax.Array | None]:
        """:meth:`attend` of a fused projection's ``qkv [B, H, W, 3, heads, d]``
        (:func:`~hybrid_attn.models.layers.attention_kernels.blocked_attention_packed`:
        same result, no q/k/v copies) when keys outside the image are masked; otherwise
        :meth:`attend` (which a subclass may override) of the split."""
        if not layout.mask_outside:
            return self.attend(*unpack_planes(qkv), layout, position, **kw)
        capture = kw.pop("return_weights", False)
        out, weights = blocked_attention_packed(qkv, layout, position=position,
                                                row_chunk=self.row_chunk,
                                                batch_chunk=self.batch_chunk,
                                                return_weights=capture, **kw)
        return out, None if weights is None else dense_block_weights(weights, layout)


Pattern = Global | Subsampled | Blocked


class Attention(nn.Module):
    """Multi-head attention over an NHWC map with a pluggable pattern and position term.

    Attributes:
      features: q/k/v width (``heads * head_dim``); None: the input's width.
      num_heads / head_dim: exactly one of them; the other follows from ``features``.
      qk_head_dim: query/key width per head when it differs from the value width
        ``head_dim`` (timm's ``dim_head`` in its ECA BoTNet / HaloNet); the fused
        projections are then laid out ``[q: heads * qk_head_dim, k: same, v: heads *
        head_dim]``, which is ``[3, heads, head_dim]`` when the widths agree.
      out_features: width of the output projection ``proj``; None for no projection
        (BoTNet, SASA: the output is ``features`` wide).
      qkv_bias: whether the q/k/v projections have a bias.
      pattern: :class:`Global`, :class:`Subsampled` or :class:`Blocked`.
      position: factory of the position term (e.g. ``RelativeBias2D`` or a
        ``functools.partial`` of one), created as the child ``position``; None for none.
      attn_dropout: dropout on the attention weights (rng stream ``dropout``).
    """

    features: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    qk_head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = True
    pattern: Pattern = Global()
    position: PositionFactory | None = None
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"Attention expects an NHWC map, got shape {x.shape}")
        b, h, w, c = x.shape
        heads, d = split_heads(self.features or c, self.num_heads, self.head_dim)
        dense = lambda n, name: Dense(  # noqa: E731
            n, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        dqk = self.qk_head_dim or d
        split = lambda t, *widths: [  # noqa: E731
            p.reshape(*t.shape[:3], heads, -1)
            for p in jnp.split(t, list(itertools.accumulate(w * heads for w in widths)), -1)]
        x_q, x_kv = self.pattern.inputs(self, x)
        packed = None
        if x_kv is None:
            qkv = dense(heads * (2 * dqk + d), "qkv")(x_q)
            q, k, v = split(qkv, dqk, dqk)
            if dqk == d and hasattr(self.pattern, "attend_packed"):
                packed = qkv.reshape(*qkv.shape[:3], 3, heads, d)
        else:
            (q,) = split(dense(heads * dqk, "q")(x_q))
            k, v = split(dense(heads * (dqk + d), "kv")(x_kv), dqk)
        layout = self.pattern.layout(q.shape[1:3], k.shape[1:3])
        term = None
        if self.position is not None:
            table = self.position(dtype=self.dtype, param_dtype=self.param_dtype, name="position")
            term = table(self.pattern.grid(layout), heads, dqk)
        capture = self.is_mutable_collection("attention") and not self.is_initializing()
        dropout = self.attn_dropout if train else 0.0
        kw = dict(dropout_rate=dropout, return_weights=capture,
                  dropout_rng=self.make_rng("dropout") if dropout > 0 else None)
        if packed is not None:  # q, k, v unused: no copies of them are made
            out, weights = self.pattern.attend_packed(packed, layout, term, **kw)
        else:
            out, weights = self.pattern.attend(q, k, v, layout, term, **kw)
        if capture:
            weights = weights[:, :, :h, :w, :h, :w]  # drops the tokens "zero_tokens" padded
            self.sow("attention", "maps", AttentionMap(
                weights, "/".join(self.path), self.pattern.kind, tuple(weights.shape[2:4]),
                tuple(weights.shape[4:6]), self.pattern.key_stride))
        out = out[:, :h, :w]  # a strided pattern returns a smaller map
        out = out.reshape(*out.shape[:3], heads * d)
        if self.out_features is not None:
            out = Dense(
                self.out_features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
            )(out)
        return out


class StridedAttention(nn.Module):
    """A ResNet bottleneck's spatial op: :meth:`attention` (the child ``attn``) on the map,
    then 2x2 average pooling where the convolution it replaces was strided (``strides=2``;
    BoTNet, SASA). Odd maps pool in ceil mode (padded cells not counted), as the strided
    1x1 shortcut conv rounds, unless the subclass sets ``even_maps_only``.
    """

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    even_maps_only: ClassVar[bool] = False

    def attention(self) -> Attention:
        """The attention module, named ``attn``; subclasses build it from their fields."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        name = type(self).__name__
        if self.strides not in (1, 2):
            raise ValueError(f"{name} strides must be 1 or 2, got {self.strides}")
        if self.strides == 2 and self.even_maps_only and (x.shape[1] % 2 or x.shape[2] % 2):
            raise ValueError(f"{name}: 2x2 pooling needs an even feature map, got {x.shape[1:3]}")
        y = self.attention()(x, train=train)
        return avg_pool2(y) if self.strides == 2 else y
