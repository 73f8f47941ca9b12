"""CoAtNet's relative attention bias and its resizing for a new input resolution.

Relative attention (Dai et al. 2021, Eq. 3) adds a learned scalar per head and per 2-D
offset to the attention logits: ``logit(i, j) = q_i . k_j / sqrt(d) + w_h[delta(i, j)]``.
Over an H x W map the offsets take (2H-1) x (2W-1) values, so each head owns a table of
that size. The table is stored as ``relative_bias_table`` with shape ``[2H-1, 2W-1, heads]``
(timm's flat ``[(2H-1)(2W-1), heads]`` table reshaped row-major), sized from the traced
query map: parameters made at one resolution must be resized with
``hybrid_attn.models.resize_position_tables`` before use at another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

TABLE_NAME = "relative_bias_table"


def _offset_indices(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column table indices ``[HW, HW]`` of every (query, key) pair, row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    return rows[:, None] - rows[None, :] + h - 1, cols[:, None] - cols[None, :] + w - 1


class RelativeBias2D(nn.Module):
    """Position term for :class:`MultiHeadAttention`: one (2H-1) x (2W-1) bias table per head.

    Called as ``position(q, q_hw, kv_hw)``; only the number of heads is read from ``q``.
    Returns ``[heads, HW, HW]`` float32 logits with ``out[h, i, j] =
    table[row_i - row_j + H - 1, col_i - col_j + W - 1, h]`` (a gather, no skewing).
    """

    param_dtype: Any = jnp.float32
    table_init: nn.initializers.Initializer = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(
        self, q: jax.Array, q_hw: Sequence[int], kv_hw: Sequence[int]
    ) -> jax.Array:
        if tuple(q_hw) != tuple(kv_hw):
            raise ValueError(
                f"RelativeBias2D needs queries and keys on the same map, got query map "
                f"{tuple(q_hw)} and key map {tuple(kv_hw)}"
            )
        h, w = q_hw
        shape = (2 * h - 1, 2 * w - 1, q.shape[-2])
        if self.has_variable("params", TABLE_NAME):
            actual = tuple(self.get_variable("params", TABLE_NAME).shape)
            if actual != shape:
                raise ValueError(
                    f"{'/'.join(self.scope.path)}/{TABLE_NAME} has shape {actual} but the "
                    f"{h}x{w} feature map of this input needs {shape} "
                    "([2H-1, 2W-1, heads]); the parameters were made for another input size. "
                    "Resize them first with "
                    "hybrid_attn.models.resize_position_tables(params, model, input_shape)."
                )
        table = self.param(TABLE_NAME, self.table_init, shape, self.param_dtype)
        rows, cols = _offset_indices(h, w)
        return jnp.moveaxis(table[rows, cols].astype(jnp.float32), -1, 0)


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

