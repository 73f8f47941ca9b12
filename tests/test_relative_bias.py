"""CoAtNet's relative bias (Dai et al. 2021, Eq. 3) against brute-force loops, and its
resizing against timm's ``resize_rel_pos_bias_table`` (goldens/coatnet_resize.npz)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models import resize_position_tables
from hybrid_attn.models.layers.attention import Attention
from hybrid_attn.models.layers.position import Grid
from hybrid_attn.models.layers.relative_bias import RelativeBias2D, resize_relative_bias

H, W, HEADS, D, C = 3, 5, 3, 4, 6  # non-square, so swapped rows/columns cannot pass
GOLDENS = pathlib.Path(__file__).parent / "goldens"


def _attention() -> Attention:
    return Attention(features=HEADS * D, num_heads=HEADS, position=RelativeBias2D)


def _apply(params, x) -> np.ndarray:
    """Jitted: one small compile is faster than dispatching the attention op by op."""
    return np.asarray(jax.jit(_attention().apply)({"params": params}, jnp.asarray(x)))


def _random_variables(seed: int = 0):
    """Attention variables at H x W with a random table (a distinct one per head)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, H, W, C)).astype(np.float32)
    params = jax.tree_util.tree_map(
        lambda p: rng.standard_normal(p.shape).astype(np.float32),
        jax.eval_shape(_attention().init, jax.random.PRNGKey(0), x)["params"],
    )
    return x, params


def test_attention_with_relative_bias_matches_brute_force_loops():
    x, params = _random_variables()
    table = params["position"]["relative_bias_table"]
    assert table.shape == (2 * H - 1, 2 * W - 1, HEADS)
    got = _apply(params, x)

    kernel = params["qkv"]["kernel"].astype(np.float64)
    bias = params["qkv"]["bias"].astype(np.float64)
    qkv = (x.reshape(2, H * W, C) @ kernel + bias).reshape(2, H * W, 3, HEADS, D)
    want = np.zeros((2, H * W, HEADS, D))
    for b in range(2):
        for n in range(HEADS):
            for i in range(H * W):
                ri, ci = divmod(i, W)
                logits = np.zeros(H * W)
                for j in range(H * W):
                    rj, cj = divmod(j, W)
                    logits[j] = (qkv[b, i, 0, n] @ qkv[b, j, 1, n] / np.sqrt(D)
                                 + table[ri - rj + H - 1, ci - cj + W - 1, n])
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                want[b, i, n] = weights @ qkv[b, :, 2, n]
    np.testing.assert_allclose(got, want.reshape(2, H, W, HEADS * D), rtol=1e-4, atol=1e-4)


def test_bias_term_matches_loops_and_table_gets_gradient():
    table = np.random.default_rng(1).standard_normal((2 * H - 1, 2 * W - 1, HEADS))
    table = jnp.asarray(table, jnp.float32)
    q = jnp.zeros((1, H * W, HEADS, D))
    term = jax.jit(lambda t: RelativeBias2D().apply(
        {"params": {"relative_bias_table": t}}, Grid((H, W), (H, W)), HEADS, D)(q))
    got = np.asarray(term(table))
    assert got.shape == (HEADS, H * W, H * W)
    for i in range(H * W):
        for j in range(H * W):
            (ri, ci), (rj, cj) = divmod(i, W), divmod(j, W)
            np.testing.assert_array_equal(got[:, i, j], table[ri - rj + H - 1, ci - cj + W - 1])

    # d sum(bias) / d table[dr, dc] counts the (query, key) pairs at that offset.
    grad = np.asarray(jax.grad(lambda t: term(t).sum())(table))
    dr = np.abs(np.arange(2 * H - 1) - (H - 1))[:, None]
    dc = np.abs(np.arange(2 * W - 1) - (W - 1))[None, :]
    np.testing.assert_array_equal(grad, np.repeat(((H - dr) * (W - dc))[..., None], HEADS, -1))


def test_gradient_reaches_every_table_entry_through_attention():
    x, params = _random_variables(2)
    cot = np.random.default_rng(3).standard_normal((2, H, W, HEADS * D))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(_attention().apply({"params": p}, x) * cot)))(
        params)
    assert np.all(np.asarray(grads["position"]["relative_bias_table"]) != 0)


def test_table_for_another_map_is_a_clear_error():
    x, params = _random_variables()
    with pytest.raises(ValueError, match=r"has shape \(5, 9, 3\) but the 4x5 feature map of "
                                         r"this input needs \(7, 9, 3\).*resize_position_tables"):
        _attention().apply({"params": params}, jnp.zeros((1, 4, W, C)))
    with pytest.raises(ValueError, match=r"query map \(3, 5\) and key map \(5, 3\)"):
        RelativeBias2D().init(jax.random.PRNGKey(0), Grid((H, W), (W, H)), HEADS, D)


def test_resize_to_the_same_size_is_the_identity():
    table = np.random.default_rng(4).standard_normal((2 * H - 1, 2 * W - 1, HEADS))
    np.testing.assert_array_equal(resize_relative_bias(table, (H, W)), table)


@pytest.mark.parametrize("case", ["up_nonsquare", "up_square", "down"])
def test_resize_matches_timm(case):
    golden = np.load(GOLDENS / "coatnet_resize.npz")
    got = resize_relative_bias(golden[f"{case}/table"], tuple(golden[f"{case}/new_hw"]))
    np.testing.assert_allclose(got, golden[f"{case}/resized"], rtol=1e-5, atol=1e-5)


def test_resize_tables_in_a_tree_then_apply_at_the_new_size():
    x, params = _random_variables()
    new = (1, 4, 7, C)
    resized = resize_position_tables(params, _attention(), new)
    assert resized["position"]["relative_bias_table"].shape == (7, 13, HEADS)
    np.testing.assert_array_equal(resized["qkv"]["kernel"], params["qkv"]["kernel"])
    out = _apply(resized, np.ones(new, np.float32))
    assert out.shape == (1, 4, 7, HEADS * D) and np.all(np.isfinite(out))
    same = resize_position_tables(params, _attention(), x.shape)
    np.testing.assert_array_equal(same["position"]["relative_bias_table"],
                                  params["position"]["relative_bias_table"])
