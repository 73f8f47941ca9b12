"""MaxViT block attention against a brute-force loop over windows on non-square maps."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import softmax

from hybrid_attn.models.layers.block_attention import BlockAttention

HEADS, D, C, P = 2, 4, 6, 3


def brute_force(x: np.ndarray, p: dict) -> np.ndarray:
    """Every query over the keys of its own P x P window (real pixels only), logits
    ``q . k / sqrt(d) + table[dr + P - 1, dc + P - 1, head]`` with (dr, dc) = query - key."""
    b, h, w, _ = x.shape
    qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, h, w, 3, HEADS, D)
    table = p["position"]["relative_bias_table"]
    out = np.zeros((b, h, w, HEADS, D))
    for i in range(h):
        for j in range(w):
            keys = [(a, c) for a in range(h) for c in range(w)
                    if a // P == i // P and c // P == j // P]
            for n in range(HEADS):
                logits = np.stack([
                    np.einsum(
                        "bd,bd->b", qkv[:, i, j, 0, n], qkv[:, a, c, 1, n]) / np.sqrt(D)
                    + table[i - a + P - 1, j - c + P - 1, n] for a, c in keys], -1)
                weights = softmax(logits)
                values = np.stack([qkv[:, a, c, 2, n] for a, c in keys], 1)
                out[:, i, j, n] = np.einsum("bk,bkd->bd", weights, values)
    return out.reshape(b, h, w, HEADS * D) @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("hw", [(6, 9), (4, 8)])  # whole windows; 4x8 pads (masked keys)
def test_matches_brute_force(hw):
    layer = BlockAttention(HEADS * D, head_dim=D, window=P)
    x = np.random.default_rng(0).normal(size=(2, *hw, C))
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x.astype(np.float32))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape), shapes)["params"]
    assert params["position"]["relative_bias_table"].shape == (2 * P - 1, 2 * P - 1, HEADS)
    f32 = jax.tree_util.tree_map(lambda a: a.astype(np.float32), params)
    got = jax.jit(layer.apply)({"params": f32}, x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), brute_force(x, params), atol=1e-4, rtol=1e-4)
