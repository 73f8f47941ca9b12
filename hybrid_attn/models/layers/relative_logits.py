"""Position logits ``q . r`` from learned per-axis embeddings (BoTNet, HaloNet, SASA).

Table modules for :class:`~hybrid_attn.models.layers.attention.Attention`'s ``position``
(see :mod:`~hybrid_attn.models.layers.position`); each returns a
:func:`~hybrid_attn.models.layers.position.embedding_logits` term bound to its tables:

* :class:`RelativeLogits2D` -- ``q_i . r_h[row(j) - row(i)] + q_i . r_w[col(j) - col(i)]``
  with tables of ``2 K - 1`` rows of the full head dimension for a key grid of K rows
  (columns), shared by the heads: Bello et al. 2019's 2-D relative logits as used by
  BoTNet (global: K = H) and by HaloNet (a b x b query block against its (b + 2h)^2 key
  block: K = b + 2h, timm's ``PosEmbedRel``). Row ``K - 1`` is a key at the same index of
  its grid as the query in its own (offset 0 for global attention, offset -h in a halo).
* :class:`AbsoluteLogits2D` -- ``q_i . (e_h[row(j)] + e_w[col(j)])`` with learned row and
  column embeddings of the key (BoTNet's absolute-encoding ablation).
* :class:`RelativeEmbedding2D` -- SASA's ``q_ij . concat(r_row[a - i], r_col[b - j])``: the
  first half of each head meets a row-offset embedding, the second half a column-offset
  one, for offsets within a k x k window.

``scale_query`` chooses whether the term sees ``q / sqrt(d)`` (BoTNet's released code and
SASA, which scale q before both logits) or the unscaled ``q`` (timm's ``BottleneckAttn`` and
``HaloAttn`` defaults, ``scale_pos_embed=False``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from hybrid_attn.models.layers.position import (
    Grid,
    LogitTerm,
    PositionTable,
    embedding_logits,
)

POSITION_KINDS = ("relative", "absolute", "none")


def _scaled_logits(q: jax.Array, row: jax.Array, col: jax.Array, *, scale: float,
                   dtype: Any, **kw) -> jax.Array:
    """:func:`embedding_logits` of ``scale * q``, computed in ``dtype``."""
    q = (q * jnp.asarray(scale, q.dtype)).astype(dtype)
    return embedding_logits(q, row.astype(dtype), col.astype(dtype), **kw)


class _EmbeddingLogits(PositionTable):
    """Shared plumbing: one table per axis (``names``), query scaling, the bound term."""

    scale_query: bool = True
    names: ClassVar[tuple[str, str]]
    split: ClassVar[bool] = False  # rows and columns meet separate halves of each head

    def _axis(self, axis: int, name: str, grid: Grid, head_dim: int) -> jax.Array:
        """Table ``name`` of ``axis`` gathered for every (query, key) pair: ``[q, k, dim]``."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, grid: Grid, num_heads: int, head_dim: int) -> LogitTerm:
        row, col = (self._axis(a, n, grid, head_dim) for a, n in enumerate(self.names))
        scale = head_dim**-0.5 if self.scale_query else 1.0
        fn = functools.partial(_scaled_logits, scale=scale, dtype=self.dtype, q_hw=grid.q_hw,
                               split=self.split)
        return LogitTerm(fn, (row, col))

    def _param(self, name: str, rows: int, dim: int, init_dim: int, grid: Grid) -> jax.Array:
        return self.table(name, (rows, dim), nn.initializers.normal(init_dim**-0.5), grid)


class RelativeLogits2D(_EmbeddingLogits):
    """Relative logits (module docstring): ``rel_height [2Kh-1, d]``, ``rel_width [2Kw-1,
    d]`` for a ``Kh x Kw`` key grid, indexed by (key index in its grid) - (query index in
    its grid) + K - 1, the skewing of timm's ``rel_logits_1d`` done as a gather."""

    names: ClassVar[tuple[str, str]] = ("rel_height", "rel_width")

    def _axis(self, axis: int, name: str, grid: Grid, head_dim: int) -> jax.Array:
        if grid.k_stride != (1, 1):
            raise ValueError(f"RelativeLogits2D needs unstrided keys, got stride {grid.k_stride}")
        k = grid.k_hw[axis]
        table = self._param(name, 2 * k - 1, head_dim, head_dim, grid)
        return table[grid.offsets(axis) - grid.k_start[axis] + k - 1]

    @classmethod
    def resize(cls, name: str, table: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
        """:func:`resize_table` to ``shape[0]`` rows (a new map size of global attention)."""
        return resize_table(table, shape[0])


class AbsoluteLogits2D(_EmbeddingLogits):
    """``q_i . (e_h[row(j)] + e_w[col(j)])``: learned ``abs_height [Kh, d]``, ``abs_width
    [Kw, d]`` embeddings of the key position (BoTNet's absolute-encoding ablation)."""

    names: ClassVar[tuple[str, str]] = ("abs_height", "abs_width")

    def _axis(self, axis: int, name: str, grid: Grid, head_dim: int) -> jax.Array:
        table = self._param(name, grid.k_hw[axis], head_dim, head_dim, grid)
        return jnp.broadcast_to(table, (grid.q_hw[axis], *table.shape))

    resize = RelativeLogits2D.resize


class RelativeEmbedding2D(_EmbeddingLogits):
    """SASA's relative embeddings (Ramachandran et al. 2019, Eq. 3) for a k x k window:
    ``rel_row [k, d/2]`` and ``rel_col [k, d/2]`` indexed by offset + k // 2.

    Their size depends only on ``window``, never on the resolution. Offsets beyond the
    window (keys of a halo block that the pattern's window mask removes) read the edge
    rows; their logits are masked out.
    """

    window: int = 7
    names: ClassVar[tuple[str, str]] = ("rel_row", "rel_col")
    split: ClassVar[bool] = True

    def _axis(self, axis: int, name: str, grid: Grid, head_dim: int) -> jax.Array:
        if head_dim % 2:
            raise ValueError(f"RelativeEmbedding2D splits each head in two halves; the head "
                             f"dimension {head_dim} is odd")
        table = self._param(name, self.window, head_dim // 2, head_dim, grid)
        return table[np.clip(grid.offsets(axis) + self.window // 2, 0, self.window - 1)]


def position_term(
    kind: str, *, scale_query: bool = True
) -> Callable[..., _EmbeddingLogits] | None:
    """The position-term factory for ``kind`` in :data:`POSITION_KINDS` ("none" gives None)."""
    classes = {"relative": RelativeLogits2D, "absolute": AbsoluteLogits2D}
    if kind == "none":
        return None
    if kind not in classes:
        raise ValueError(f"Unknown position kind {kind!r}; valid: {', '.join(POSITION_KINDS)}")
    return functools.partial(classes[kind], scale_query=scale_query)


def resize_table(table: ArrayLike, rows: int) -> jax.Array:
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
