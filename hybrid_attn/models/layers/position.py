"""Position terms of attention: who owns the table, and the pure functions that use it.

A position term has two halves:

* a **table module** (:class:`PositionTable` subclasses in ``relative_bias.py`` and
  ``relative_logits.py``): it creates its learned tables, sized from the
  :class:`Grid` the attention pattern hands it, and declares with :meth:`PositionTable.
  resize` how a trained table is resampled for another input size; and
* a **logit function**, pure (no parameters, no scope), which the table module returns
  bound to its tables as a :class:`LogitTerm` (a pytree): ``term(q)`` maps *unscaled*
  queries ``[..., Nq, heads, d]`` to an additive float32 logit term broadcastable to
  ``[..., heads, Nq, Nk]``. A kernel may call it inside ``vmap`` / ``lax.map`` (the
  blocked kernel calls it once per block row).

The attention module always creates the table module as its child ``position``, so every
table lives at ``.../attn/position/<table>`` (the one scope named ``position``: weight
decay and table resizing find tables by it).

**One offset convention.** :func:`relative_offsets` gives, for each query and key along one
axis, ``key position - query position`` in image coordinates. The papers index as follows:

* BoTNet (Srinivas et al. 2021, Fig. 4; Bello et al. 2019): ``q_x . r_{x'-x}`` with x' the
  key: the offset itself.
* SASA (Ramachandran et al. 2019, Eq. 3): ``q_ij . r_{a-i, b-j}`` with ab the key: the
  offset itself.
* CoAtNet (Dai et al. 2021, Eq. 3): ``w_{i-j}`` with i the query and j the key: the
  *negated* offset (timm's ``relative_position_index`` is the same ``i - j``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from numpy.typing import ArrayLike

Dtype = Any
RESIZE_HINT = ("Resize the tables for this input first with "
               "hybrid_attn.models.resize_position_tables(params, model, input_shape).")


def relative_offsets(n_q: int, n_k: int, start: int = 0, stride: int = 1) -> np.ndarray:
    """``[n_q, n_k]`` offsets ``key - query`` along one axis (the module docstring's sign).

    Query ``i`` sits at position ``i``; key ``j`` at ``start + stride * j`` (a key block
    with a halo of h starts at ``-h``; keys sub-sampled by r have ``stride = r``).
    """
    return start + stride * np.arange(n_k)[None, :] - np.arange(n_q)[:, None]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where one attention window's queries and keys sit, per axis (height, width).

    ``q_hw`` queries at positions ``0 .. q - 1`` and ``k_hw`` keys at ``k_start + k_stride *
    j``: global self-attention on an H x W map is ``Grid((H, W), (H, W))``; a b x b query
    block with halo h is ``Grid((b, b), (b + 2h, b + 2h), (-h, -h))``.
    """

    q_hw: tuple[int, int]
    k_hw: tuple[int, int]
    k_start: tuple[int, int] = (0, 0)
    k_stride: tuple[int, int] = (1, 1)

    def offsets(self, axis: int) -> np.ndarray:
        """:func:`relative_offsets` along ``axis`` (0 = rows, 1 = columns)."""
        return relative_offsets(self.q_hw[axis], self.k_hw[axis], self.k_start[axis],
                                self.k_stride[axis])

    @property
    def is_self(self) -> bool:
        """Queries and keys are the same positions (global self-attention, or a block
        without halo)."""
        return self.q_hw == self.k_hw and self.k_start == (0, 0) and self.k_stride == (1, 1)


class LogitTerm(struct.PyTreeNode):
    """A pure logit function bound to its tables: ``term(q) = fn(q, *tables)``.

    A pytree (the tables are its leaves), so it can be returned from a module, captured
    with ``capture_intermediates`` and passed into transformed kernels.
    """

    fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    tables: tuple[jax.Array, ...] = ()

    def __call__(self, q: jax.Array) -> jax.Array:
        return self.fn(q, *self.tables)


def bias_logits(q: jax.Array, table: jax.Array, *, rows: np.ndarray,
                cols: np.ndarray) -> jax.Array:
    """``out[h, (i, j), (a, b)] = table[rows[i, a], cols[j, b], h]``: a per-head bias gathered
    by row and column index, ``[heads, Nq, Nk]`` float32 (CoAtNet, MaxViT); ``q`` unused."""
    del q
    t = table[rows[:, None, :, None], cols[None, :, None, :]]  # [qh, qw, kh, kw, heads]
    qh, qw, kh, kw, heads = t.shape
    return jnp.moveaxis(t.astype(jnp.float32), -1, 0).reshape(heads, qh * qw, kh * kw)


def embedding_logits(
    q: jax.Array, row: jax.Array, col: jax.Array, *, q_hw: Sequence[int], split: bool = False
) -> jax.Array:
    """``q_(i,j) . row[i, a] + q_(i,j) . col[j, b]`` for query (i, j) and key (a, b).

    ``q`` is ``[..., Nq, heads, d]``; ``row`` ``[qh, kh, dr]`` and ``col`` ``[qw, kw, dc]``
    are per-axis embeddings already gathered for every (query, key) pair. With ``split``
    the rows meet the first ``dr`` channels of each head and the columns the remaining
    ``dc`` (SASA); otherwise both meet all ``d`` (BoTNet, HaloNet). Returns ``[..., heads,
    Nq, Nk]`` float32.
    """
    *lead, nq, heads, d = q.shape
    q = q.reshape(*lead, *q_hw, heads, d)
    q_row, q_col = (q[..., :row.shape[-1]], q[..., row.shape[-1]:]) if split else (q, q)
    f32 = jnp.float32
    row_logits = jnp.einsum("...ijhd,iad->...hija", q_row, row.astype(q.dtype),
                            preferred_element_type=f32)
    col_logits = jnp.einsum("...ijhd,jbd->...hijb", q_col, col.astype(q.dtype),
                            preferred_element_type=f32)
    logits = row_logits[..., :, None] + col_logits[..., None, :]
    return logits.reshape(*lead, heads, nq, row.shape[1] * col.shape[1])


class PositionTable(nn.Module):
    """Base of the table-owning half of a position term (see the module docstring).

    Subclasses implement ``__call__(grid, num_heads, head_dim) -> LogitTerm`` (compact) and,
    if their tables depend on the input size, :meth:`resize`.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def table(self, name: str, shape: tuple[int, ...], init: nn.initializers.Initializer,
              grid: Grid) -> jax.Array:
        """The parameter ``name`` of ``shape``; a stored table of another shape (made for
        another input size) is a ValueError naming both shapes and the resize helper."""
        if self.has_variable("params", name):
            actual = tuple(self.get_variable("params", name).shape)
            if actual != tuple(shape):
                (qh, qw), (kh, kw) = grid.q_hw, grid.k_hw
                where = f"{qh}x{qw} {'feature' if (qh, qw) == (kh, kw) else 'query'} map"
                where += "" if (qh, qw) == (kh, kw) else f" ({kh}x{kw} keys)"
                raise ValueError(
                    f"{'/'.join(self.path)}/{name} has shape {actual} but the {where} of this "
                    f"input needs {tuple(shape)}; the parameters were made for another input "
                    f"size. {RESIZE_HINT}"
                )
        return self.param(name, init, shape, self.param_dtype)

    @classmethod
    def resize(cls, name: str, table: ArrayLike, shape: tuple[int, ...]) -> ArrayLike:
        """Resamples the stored ``table`` called ``name`` to ``shape`` (the shape the model
        needs at a new input size). The default: tables that never change size."""
        raise ValueError(
            f"{cls.__name__} table {name!r} of shape {tuple(np.shape(table))} cannot be "
            f"resized to {tuple(shape)}"
        )
