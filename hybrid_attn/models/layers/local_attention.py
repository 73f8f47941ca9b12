"""Local self-attention over k x k neighbourhoods, computed block-wise (SASA, Twins LSA).

Ramachandran et al. 2019 (SASA), Eq. 3: every pixel ij attends to the pixels ab of its
k x k neighbourhood, with relative embeddings added on the keys,

    y_ij = sum_ab softmax_ab(q_ij . (k_ab + r_{a-i, b-j}) / sqrt(d)) v_ab,

per head, where ``r_{a-i,b-j}`` concatenates a row-offset and a column-offset embedding
(half of the head dimension each). The paper's Eq. 3 writes ``q . k + q . r`` with no
scale at all; we use the standard scaled dot product on the whole logit (content and
position term alike), as the attention of every other family here does. Keys outside the
image are masked out (they are not zero-padding tokens), so a border pixel attends to
fewer than k*k keys.

Method (why it is memory-efficient): the naive port unfolds a k x k copy of the keys and
values for every pixel (k*k = 49 times the map). Here the map is cut into query blocks of
b x b pixels; each block attends to its own pixels plus a halo of k//2 pixels on every
side (Vaswani et al. 2021, "blocked local attention"), with a mask keeping each query to
its own k x k window. Rows of blocks are processed one after another (``row_chunk``) in a
loop rematerialised in the backward pass, so only one block row's key/value copy
(``((b + k - 1) / b)^2`` of that row) and logits (``(b + k - 1)^2`` per query and head)
are alive at a time. An axis that fits in one block gets no halo (it would hold only
masked padding), so a map smaller than the window costs no more than global attention.

XLA temporary memory (``jax.jit(f).lower(...).compile().memory_analysis()``, CPU, float32)
for batch 8 on a 56x56x64 map (6.1 MiB; 8 heads, k = 7), next to a 3x3 conv 64 -> 64:

    op                                           forward     forward + backward
    3x3 convolution                               0.0 MiB       18.4 MiB
    this layer, defaults (b = 4, row_chunk = 1)  39.5 MiB       91.9 MiB
    this layer, b = 8, row_chunk = 1             51.9 MiB      119.2 MiB
    this layer, b = 4, all blocks at once       165.4 MiB      451.6 MiB
    this layer, b = 8, all blocks at once       199.8 MiB      696.4 MiB
    naive k x k unfold of keys and values       906.5 MiB     1219.6 MiB

Of the default's 39.5 MiB, 18.4 MiB are the q/k/v projections themselves (3x the map) and
15 MiB the halo-padded keys and values; the attention proper adds about 1x the map. On
this CPU the defaults are also the fastest variant (forward ~0.2 s; naive unfold ~1.2 s;
the convolution ~0.03 s). Smaller blocks waste fewer logits on masked keys ((b + k - 1)^2
per query against k^2 needed) at the price of more key/value duplication.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hybrid_attn.models.layers.attention import PositionTerm, dot_product_attention

Dtype = Any


def _block_side(n: int, max_block: int, window: int) -> int:
    """Query block side along an axis of length ``n``.

    The whole axis when ``n <= window`` (every query then sees most of the axis, and one
    block has no halo: cheapest); otherwise the smallest side <= ``max_block`` that tiles
    ``n`` in the fewest blocks, minimising padding (``max_block = 8``: 56 -> 8, 28 -> 7).
    """
    if n <= window:
        return n
    return -(-n // -(-n // max_block))


def _unfold(t: jax.Array, axis: int, count: int, size: int, stride: int) -> jax.Array:
    """``count`` windows of ``size`` along ``axis`` at ``stride``: [..., count, size, ...]."""
    if size == stride:
        return t.reshape(t.shape[:axis] + (count, size) + t.shape[axis + 1:])
    index = np.arange(count)[:, None] * stride + np.arange(size)[None, :]
    return jnp.take(t, index, axis=axis)


def _axis_mask(n: int, count: int, block: int, halo: int, window: int | None) -> np.ndarray:
    """[count, block, block + 2 * halo]: key inside the image and inside the query's window."""
    kv = np.arange(block + 2 * halo) - halo  # key position relative to the block start
    position = np.arange(count)[:, None, None] * block + kv  # [count, 1, keys] in the image
    inside = (position >= 0) & (position < n)
    if window is not None:
        inside = inside & (np.abs(kv[None, :] - np.arange(block)[:, None]) <= window // 2)
    return np.broadcast_to(inside, (count, block, kv.size))


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block: tuple[int, int],
    halo: tuple[int, int] = (0, 0),
    window: tuple[int, int] | None = None,
    position: PositionTerm | None = None,
    scale: float | None = None,
    row_chunk: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Attention of each ``block`` of queries to the same block of keys plus a ``halo``.

    With ``halo=(0, 0)`` and no ``window`` this is non-overlapping window attention
    (Twins' locally-grouped attention, the SASA attention stem). With ``halo = k // 2`` and
    ``window = k`` it is exact k x k neighbourhood attention (SASA). Maps that are not a
    multiple of ``block`` are padded; padded keys are masked, padded queries dropped.

    Args:
      q, k: ``[B, H, W, heads, d]`` queries (unscaled) and keys.
      v: ``[B, H, W, heads, dv]`` values.
      block: query block (height, width).
      halo: extra key rows/columns on each side of a block.
      window: if set, each query only attends to keys within ``window // 2`` rows and
        columns of itself (odd sizes).
      position: pure function ``position(q_block, block, key_block)`` returning additive
        logits; ``q_block`` is unscaled, ``[..., bh*bw, heads, d]``, and the result must
        broadcast to ``[..., heads, bh*bw, kh*kw]`` for the key block ``(kh, kw) = block +
        2 * halo`` centred on the query block (see :func:`row_column_logits`).
      scale: logit scale for ``q . k``; defaults to ``1 / sqrt(d)``.
      row_chunk: if set, rows of blocks are processed ``row_chunk`` at a time in a
        sequential loop whose body is rematerialised in the backward pass, so the logits
        of only that many block rows are ever alive (forward and backward). None
        processes every block at once (fastest, most memory).
      dropout_rate, dropout_rng: dropout on the attention weights (an independent mask
        per block row).

    Returns:
      ``[B, H, W, heads, dv]`` in the dtype of ``v``.
    """
    if q.ndim != 5 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "blocked_attention expects q, k of shape [B, H, W, heads, d] and v of shape "
            f"[B, H, W, heads, dv]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if row_chunk is not None and row_chunk < 1:
        raise ValueError(f"row_chunk must be None or a positive number of rows, got {row_chunk}")
    b, h, w, heads, d = q.shape
    dv = v.shape[-1]
    (bh, bw), (hh, hw) = block, halo
    nh, nw = -(-h // bh), -(-w // bw)
    # A single block along an axis covers the whole axis: its halo would be all padding.
    hh, hw = (0 if nh == 1 else hh), (0 if nw == 1 else hw)
    kh, kw = bh + 2 * hh, bw + 2 * hw
    hp, wp = nh * bh, nw * bw
    scale = d**-0.5 if scale is None else scale
    q = jnp.pad(q, ((0, 0), (0, hp - h), (0, wp - w), (0, 0), (0, 0)))
    k, v = (
        jnp.pad(t, ((0, 0), (hh, hp - h + hh), (hw, wp - w + hw), (0, 0), (0, 0))) for t in (k, v)
    )
    rows = _axis_mask(h, nh, bh, hh, window[0] if window else None)
    cols = _axis_mask(w, nw, bw, hw, window[1] if window else None)
    masked = not (rows.all() and cols.all())

    def block_row(n: jax.Array) -> jax.Array:
        """Output rows ``[n * bh, (n + 1) * bh)``: ``[B, bh, wp, heads, dv]``."""
        qn = lax.dynamic_slice_in_dim(q, n * bh, bh, axis=1)
        qn = qn.reshape(b, bh, nw, bw, heads, d).transpose(0, 2, 1, 3, 4, 5)
        qn = qn.reshape(b, nw, bh * bw, heads, d)

        def keys(t: jax.Array) -> jax.Array:
            t = _unfold(lax.dynamic_slice_in_dim(t, n * bh, kh, axis=1), 2, nw, kw, bw)
            return t.transpose(0, 2, 1, 3, 4, 5).reshape(b, nw, kh * kw, heads, -1)

        mask = None
        if masked:
            row_mask = jnp.asarray(rows)[n][None, :, None, :, None]
            mask = row_mask & jnp.asarray(cols)[:, None, :, None, :]
            mask = mask.reshape(nw, 1, bh * bw, kh * kw)  # [nw, heads, queries, keys]
        bias = position(qn, (bh, bw), (kh, kw)) if position is not None else None
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, n)
        out = dot_product_attention(
            qn * jnp.asarray(scale, qn.dtype), keys(k), keys(v), bias=bias, mask=mask,
            dropout_rate=dropout_rate, dropout_rng=rng,
        )
        out = out.reshape(b, nw, bh, bw, heads, dv).transpose(0, 2, 1, 3, 4, 5)
        return out.reshape(b, bh, wp, heads, dv)

    index = jnp.arange(nh)
    if row_chunk is None or row_chunk >= nh:
        out = jax.vmap(block_row)(index)
    else:
        batch = row_chunk if row_chunk > 1 else None  # None: no vmap inside the loop
        out = lax.map(jax.checkpoint(block_row), index, batch_size=batch)
    return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, hp, wp, heads, dv)[:, :h, :w]


def row_column_logits(
    q: jax.Array,
    q_hw: tuple[int, int],
    kv_hw: tuple[int, int],
    *,
    rel_row: jax.Array,
    rel_col: jax.Array,
    scale: float = 1.0,
) -> jax.Array:
    """SASA's relative position logits ``scale * q_ij . concat(rel_row[a - i], rel_col[b - j])``.

    The first half of each head's dimension meets a row-offset embedding, the second half
    a column-offset embedding (Ramachandran et al. 2019, Sec. 2.2); ``rel_row`` is
    ``[window_h, d/2]`` and ``rel_col`` ``[window_w, d - d/2]``, indexed by offset +
    window // 2 and shared by all heads. Offsets outside the window get no embedding
    (callers mask them). The key grid ``kv_hw`` is centred on the query grid ``q_hw``.

    Args:
      q: ``[..., q_h * q_w, heads, d]`` unscaled queries.
      scale: applied to the queries (``1 / sqrt(d)`` in :class:`LocalSelfAttention`, the
        same scale as the content logits ``q . k``).

    Returns:
      ``[..., heads, q_h * q_w, kv_h * kv_w]`` logits in float32.
    """
    *lead, nq, heads, d = q.shape
    half = rel_row.shape[-1]
    if rel_row.shape[-1] + rel_col.shape[-1] != d:
        raise ValueError(
            f"rel_row {rel_row.shape} and rel_col {rel_col.shape} must split head dim {d}"
        )
    q = (q * jnp.asarray(scale, q.dtype)).reshape(*lead, *q_hw, heads, d)
    row, col = (
        jnp.einsum("iar,rd->iad", _one_hot_offsets(n_q, n_kv, table.shape[0]), table)
        for n_q, n_kv, table in zip(q_hw, kv_hw, (rel_row, rel_col))
    )
    row_logits = jnp.einsum("...ijhd,iad->...hija", q[..., :half], row.astype(q.dtype),
                            preferred_element_type=jnp.float32)
    col_logits = jnp.einsum("...ijhd,jbd->...hijb", q[..., half:], col.astype(q.dtype),
                            preferred_element_type=jnp.float32)
    logits = row_logits[..., :, None] + col_logits[..., None, :]
    return logits.reshape(*lead, heads, nq, kv_hw[0] * kv_hw[1])


def _one_hot_offsets(n_q: int, n_kv: int, window: int) -> np.ndarray:
    """[n_q, n_kv, window]: one-hot of the offset (key - query) + window // 2, keys centred."""
    if (n_kv - n_q) % 2:
        raise ValueError(f"key grid {n_kv} is not centred on query grid {n_q}")
    offset = np.arange(n_kv)[None, :] - (n_kv - n_q) // 2 - np.arange(n_q)[:, None]
    return (offset[..., None] + window // 2 == np.arange(window)).astype(np.float32)


class LocalSelfAttention(nn.Module):
    """SASA's local self-attention layer: k x k neighbourhoods, multi-head, relative
    row/column embeddings, q/k/v 1x1 projections without bias and no output projection.

    Logits are ``q . (k + r) / sqrt(d)`` (module docstring). Params: ``qkv`` (a fused
    bias-free Dense laid out ``[3, heads, head_dim]``, as in
    :class:`~hybrid_attn.models.layers.attention.MultiHeadAttention`), ``rel_row``
    ``[k, head_dim/2]`` and ``rel_col`` ``[k, head_dim/2]`` (:func:`row_column_logits`;
    their size depends only on k, so a new resolution needs no resizing). Output width
    is ``features``; the spatial size is unchanged.

    Attributes:
      features: output width (``num_heads * head_dim``); head_dim must be even.
      num_heads: number of heads (the paper uses 8).
      kernel_size: spatial extent k (odd; the paper uses 7).
      block_size: largest query block side of the block-wise computation.
      row_chunk: block rows per sequential step (:func:`blocked_attention`); None = all.
        ``block_size`` and ``row_chunk`` trade memory for speed, never change the result.
    """

    features: int
    num_heads: int = 8
    kernel_size: int = 7
    block_size: int = 4
    row_chunk: int | None = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        heads, ks = self.num_heads, self.kernel_size
        if ks % 2 == 0 or ks < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {ks}")
        if self.features % heads or (self.features // heads) % 2:
            raise ValueError(
                f"features ({self.features}) must split into {heads} heads of even size"
            )
        if x.ndim != 4:
            raise ValueError(f"LocalSelfAttention expects an NHWC map, got shape {x.shape}")
        b, h, w, _ = x.shape
        d = self.features // heads
        qkv = nn.Dense(
            3 * self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            name="qkv",
        )(x).reshape(b, h, w, 3, heads, d)
        init = nn.initializers.normal(stddev=d**-0.5)
        rel_row, rel_col = (
            self.param(name, init, (ks, d // 2), self.param_dtype).astype(self.dtype)
            for name in ("rel_row", "rel_col")
        )
        out = blocked_attention(
            qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
            block=(_block_side(h, self.block_size, ks), _block_side(w, self.block_size, ks)),
            halo=(ks // 2, ks // 2), window=(ks, ks),
            position=functools.partial(row_column_logits, rel_row=rel_row, rel_col=rel_col,
                                       scale=d**-0.5),
            row_chunk=self.row_chunk,
        )
        return out.reshape(b, h, w, self.features)
