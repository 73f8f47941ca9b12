"""Position logits for global self-attention over a 2-D feature map (BoTNet, Fig. 4).

Position terms for :class:`~hybrid_attn.models.layers.attention.MultiHeadAttention`,
called as ``term(q, q_hw, kv_hw)`` with unscaled queries ``q [B, Nq, heads, d]``:

* :class:`RelativeLogits2D` -- ``q_i . r_h[row(j) - row(i)] + q_i . r_w[col(j) - col(i)]``
  with learned tables of (2H-1) and (2W-1) rows of the full head dimension, shared by the
  heads (Bello et al. 2019's 2-D relative logits, as used by BoTNet).
* :class:`AbsoluteLogits2D` -- ``q_i . (e_h[row(j)] + e_w[col(j)])`` with learned row and
  column embeddings (the paper's absolute-encoding ablation).
* ``None`` -- content only (``q . k``).

The table sizes come from the traced feature map; a map of another size raises a
ValueError that says which size the tables were built for. :func:`resize_table` resamples
a table to a new map size for fine-tuning at another resolution.

``scale_query`` chooses whether the position term sees ``q / sqrt(d)`` (the authors'
released code, which scales q before computing both logits) or the unscaled ``q`` (timm's
``BottleneckAttn`` default, ``scale_pos_embed=False``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

POSITION_KINDS = ("relative", "absolute", "none")
TABLE_NAMES = ("rel_height", "rel_width", "abs_height", "abs_width")


def relative_index(n: int) -> jax.Array:
    """``[n, n]`` table row for (query i, key j): the offset ``j - i`` shifted to ``>= 0``."""
    pos = jnp.arange(n)
    return pos[None, :] - pos[:, None] + (n - 1)


class _Position2D(nn.Module):
    """Shared plumbing: size checks, query scaling and the learned tables."""

    scale_query: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self, q: jax.Array, q_hw: tuple[int, int], kv_hw: tuple[int, int]) -> jax.Array:
        if tuple(q_hw) != tuple(kv_hw):
            raise ValueError(
                f"{type(self).__name__} is for self-attention; query map {tuple(q_hw)} and "
                f"key map {tuple(kv_hw)} differ"
            )
        if q.shape[1] != q_hw[0] * q_hw[1]:
            raise ValueError(f"queries have {q.shape[1]} positions, expected {q_hw[0] * q_hw[1]}")
        if self.scale_query:
            q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        return q.reshape(q.shape[0], q_hw[0], q_hw[1], *q.shape[2:]).astype(self.dtype)

    def _table(self, name: str, rows: int, dim: int, map_hw: tuple[int, int]) -> jax.Array:
        if self.has_variable("params", name):
            have = self.get_variable("params", name).shape[0]
            if have != rows:
                built = (have + 1) // 2 if name.startswith("rel") else have
                axis = "height" if name.endswith("height") else "width"
                raise ValueError(
                    f"{'/'.join(self.path)}/{name} has {have} rows, built for a feature map "
                    f"of {axis} {built}, but this input gives a {map_hw[0]}x{map_hw[1]} map "
                    f"({rows} rows). Resize the tables for the new resolution first "
                    f"(hybrid_attn.models.resize_position_tables)."
                )
        table = self.param(name, nn.initializers.normal(dim**-0.5), (rows, dim), self.param_dtype)
        return table.astype(self.dtype)


class RelativeLogits2D(_Position2D):
    """``q_i . r_h[row(j) - row(i)] + q_i . r_w[col(j) - col(i)]`` (BoTNet Fig. 4).

    Parameters ``rel_height [2H-1, d]`` and ``rel_width [2W-1, d]``; row ``H-1`` is offset 0.
    Computed in gather form: each table is expanded to ``[H, H, d]`` (``[W, W, d]``) by
    :func:`relative_index` and contracted with the queries of every row (column).
    """

    @nn.compact
    def __call__(
        self, q: jax.Array, q_hw: tuple[int, int], kv_hw: tuple[int, int]
    ) -> jax.Array:
        q = self._check(q, q_hw, kv_hw)
        b, h, w, heads, d = q.shape
        rel_h = self._table("rel_height", 2 * h - 1, d, (h, w))[relative_index(h)]
        rel_w = self._table("rel_width", 2 * w - 1, d, (h, w))[relative_index(w)]
        # logits_h[b, n, x, y, k] = q[b, x, y, n] . rel_h[x, k]: key row k, query (x, y).
        logits_h = jnp.einsum("bxynd,xkd->bnxyk", q, rel_h, preferred_element_type=jnp.float32)
        logits_w = jnp.einsum("bxynd,ykd->bnxyk", q, rel_w, preferred_element_type=jnp.float32)
        logits = logits_h[..., :, None] + logits_w[..., None, :]
        return logits.reshape(b, heads, h * w, h * w)


class AbsoluteLogits2D(_Position2D):
    """``q_i . (e_h[row(j)] + e_w[col(j)])``: learned ``abs_height [H, d]``, ``abs_width
    [W, d]`` embeddings of the key position (BoTNet's absolute-encoding ablation)."""

    @nn.compact
    def __call__(
        self, q: jax.Array, q_hw: tuple[int, int], kv_hw: tuple[int, int]
    ) -> jax.Array:
        q = self._check(q, q_hw, kv_hw)
        b, h, w, heads, d = q.shape
        emb_h = self._table("abs_height", h, d, (h, w))
        emb_w = self._table("abs_width", w, d, (h, w))
        logits_h = jnp.einsum("bxynd,kd->bnxyk", q, emb_h, preferred_element_type=jnp.float32)
        logits_w = jnp.einsum("bxynd,kd->bnxyk", q, emb_w, preferred_element_type=jnp.float32)
        logits = logits_h[..., :, None] + logits_w[..., None, :]
        return logits.reshape(b, heads, h * w, h * w)


def position_term(
    kind: str,
    *,
    scale_query: bool = True,
    name: str = "position",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> _Position2D | None:
    """The position term for ``kind`` in :data:`POSITION_KINDS` ("none" gives None)."""
    classes = {"relative": RelativeLogits2D, "absolute": AbsoluteLogits2D}
    if kind == "none":
        return None
    if kind not in classes:
        raise ValueError(f"Unknown position kind {kind!r}; valid: {', '.join(POSITION_KINDS)}")
    return classes[kind](scale_query, dtype=dtype, param_dtype=param_dtype, name=name)


def resize_table(table: jax.Array, rows: int) -> jax.Array:
    """Linearly resamples a position table ``[n, d]`` along its rows to ``[rows, d]``.

    For fine-tuning at a new resolution (e.g. 224 -> 384): relative tables go from 2H-1
    to 2H'-1 rows, absolute ones from H to H' rows. Offsets are stretched with the image,
    so the table keeps describing the same fraction of the field of view.
    """
    table = jnp.asarray(table)
    if table.shape[0] == rows:
        return table
    out = jax.image.resize(table.astype(jnp.float32), (rows, table.shape[1]), "linear",
                           antialias=False)
    return out.astype(table.dtype)
