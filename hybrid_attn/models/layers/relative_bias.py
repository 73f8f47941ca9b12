"""CoAtNet's relative attention bias and its resizing for a new input resolution.

Relative attention (Dai et al. 2021, Eq. 3) adds a learned scalar per head and per 2-D
offset to the attention logits: ``logit(i, j) = q_i . k_j / sqrt(d) + w_h[i - j]`` (i the
query, j the key: the negated offset of :func:`~hybrid_attn.models.layers.position.
relative_offsets`). Over an H x W window the offsets take (2H-1) x (2W-1) values, so each
head owns a table of that size, stored as ``relative_bias_table`` with shape ``[2H-1,
2W-1, heads]`` (timm's flat ``[(2H-1)(2W-1), heads]`` table reshaped row-major). It is
sized from the traced window: the whole map for global attention (CoAtNet; resized for a
new resolution by ``hybrid_attn.models.resize_position_tables``), a block for block
attention (MaxViT; never resized).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from numpy.typing import ArrayLike

from hybrid_attn.models.layers.position import Grid, LogitTerm, PositionTable, bias_logits

TABLE_NAME = "relative_bias_table"


class RelativeBias2D(PositionTable):
    """Position term: one (2H-1) x (2W-1) bias table per head for an H x W window.

    The term ignores ``q`` and returns ``[heads, HW, HW]`` float32 logits with ``out[h, i,
    j] = table[row_i - row_j + H - 1, col_i - col_j + W - 1, h]`` (a gather, no skewing).
    """

    table_init: nn.initializers.Initializer = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(self, grid: Grid, num_heads: int, head_dim: int) -> LogitTerm:
        if not grid.is_self:
            raise ValueError(
                f"RelativeBias2D needs queries and keys on the same positions, got query map "
                f"{grid.q_hw} and key map {grid.k_hw} (start {grid.k_start}, stride "
                f"{grid.k_stride})"
            )
        (h, w), (rows, cols) = grid.q_hw, (grid.offsets(0), grid.offsets(1))
        table = self.bias_table(grid, num_heads)
        return LogitTerm(functools.partial(bias_logits, rows=h - 1 - rows, cols=w - 1 - cols),
                         (table,))

    def bias_table(self, grid: Grid, num_heads: int) -> jax.Array:
        """The ``[2H-1, 2W-1, heads]`` table: here a learned parameter (subclasses may
        compute it, e.g. :class:`~hybrid_attn.models.layers.relative_mlp.RelativeMlp`)."""
        h, w = grid.q_hw
        return self.table(TABLE_NAME, (2 * h - 1, 2 * w - 1, num_heads), self.table_init, grid)

    @classmethod
    def resize(cls, name: str, table: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
        """:func:`resize_relative_bias` to the ``[2H-1, 2W-1, heads]`` ``shape``."""
        return resize_relative_bias(table, ((shape[0] + 1) // 2, (shape[1] + 1) // 2))


def _beit_positions(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target sample positions of timm's (BEiT's) table resampling along one axis.

    The ``src`` source offsets are spread on a geometric progression whose extent matches
    the ``dst`` target offsets, so small offsets keep their spacing and large ones stretch.
    """
    def progression(ratio: float, n: int) -> float:
        return (1.0 - ratio**n) / (1.0 - ratio)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if progression(ratio, src // 2) > dst // 2:
            right = ratio
        else:
            left = ratio
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += ratio ** (i + 1)
    source = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    half = dst // 2
    return source, np.arange(-half, half + 1, dtype=np.float64)


def _interp_axis(table: np.ndarray, axis: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Piecewise-linear resampling of ``table`` along ``axis``, clamped at the ends."""
    return np.apply_along_axis(lambda v: np.interp(dst, src, v), axis, table)


def resize_relative_bias(table: ArrayLike, new_hw: Sequence[int]) -> np.ndarray:
    """Resamples a ``[2h-1, 2w-1, heads]`` table for an ``new_hw`` = (H, W) feature map.

    Follows timm's ``resize_rel_pos_bias_table`` (BEiT's geometric offset spacing with
    linear interpolation, computed per head), which is what timm applies when loading
    CoAtNet weights at a new size, e.g. 224 -> 384 fine-tuning. One deliberate difference:
    an axis whose size does not change is left untouched (timm resamples it slightly when
    only the other axis changes), so resizing to the same size is exactly the identity.
    A host-side (numpy, float64) load-time operation; the result keeps the input's dtype.
    """
    table = np.asarray(table)
    if table.ndim != 3:
        raise ValueError(f"Expected a [2H-1, 2W-1, heads] table, got shape {table.shape}")
    out = table.astype(np.float64)
    for axis, n in enumerate(new_hw):
        src, dst = out.shape[axis], 2 * n - 1
        if src != dst:
            out = _interp_axis(out, axis, *_beit_positions(src, dst))
    return out.astype(table.dtype)

