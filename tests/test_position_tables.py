"""resize_position_tables resizes each table as the PositionTable class that owns it
declares, found by module path, and refuses leaves that are not position tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hybrid_attn.models import resize_position_tables
from hybrid_attn.models.layers.attention import Attention
from hybrid_attn.models.layers.position import Grid, LogitTerm, PositionTable


class _RowTable(PositionTable):
    """A toy table of one row per query row; its declared resize fills with the new size."""

    @nn.compact
    def __call__(self, grid: Grid, num_heads: int, head_dim: int) -> LogitTerm:
        table = self.table("rows", (grid.q_hw[0], num_heads), nn.initializers.ones, grid)
        return LogitTerm(lambda q, t: jnp.zeros(()) * t.sum(), (table,))

    @classmethod
    def resize(cls, name, table, shape):
        return np.full(shape, float(shape[0]), np.float32)


def _model() -> Attention:
    return Attention(features=8, num_heads=2, position=_RowTable)


def test_each_table_resizes_as_its_class_declares():
    params = jax.eval_shape(_model().init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 4, 8)))
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), params)["params"]
    resized = resize_position_tables(params, _model(), (1, 5, 4, 8))
    np.testing.assert_array_equal(resized["position"]["rows"], np.full((5, 2), 5.0))
    np.testing.assert_array_equal(resized["qkv"]["kernel"], params["qkv"]["kernel"])
    with pytest.raises(ValueError, match=r"rows has shape \(3, 2\) but the 5x4 feature map"):
        _model().apply({"params": params}, jnp.zeros((1, 5, 4, 8)))


def test_leaves_that_are_not_tables_are_refused():
    params = jax.eval_shape(_model().init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"params/qkv/kernel has shape \(8, 24\) but the model "
                                         r"at this input needs \(6, 24\), and it is not a "
                                         r"position table"):
        resize_position_tables(params["params"], _model(), (1, 3, 4, 6))
