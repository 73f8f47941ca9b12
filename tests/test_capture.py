"""Attention capture (hybrid_attn.models.capture): the sown weights are a softmax over the
keys each query may see, exactly 0 elsewhere, and reproduce the layer's output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.capture import attention_maps
from hybrid_attn.models.layers.attention import Attention, Blocked, Subsampled
from hybrid_attn.models.layers.local_attention import LocalSelfAttention
from hybrid_attn.models.layers.relative_bias import RelativeBias2D
from hybrid_attn.models.twins import Twins

H, W, C = 5, 7, 6  # non-square


def _layers() -> dict[str, Attention]:
    return {
        "global": Attention(features=8, num_heads=2, out_features=C, position=RelativeBias2D),
        "blocked": LocalSelfAttention(8, num_heads=2, kernel_size=3, block_size=2),
        "windows": Attention(num_heads=2, out_features=C, pattern=Blocked(4)),
        "subsampled": Attention(num_heads=3, out_features=C, pattern=Subsampled(2)),
    }


def _run(layer: Attention, seed: int = 0):
    """Output, captured map and the layer's values ``[B, Hk, Wk, heads, d]`` (from the
    intermediate output of its ``qkv`` / ``kv`` projection)."""
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, H, W, C)), jnp.float32)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed + 1)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5,
                                    shapes)
    out, state = jax.jit(lambda p, x: layer.apply(
        p, x, mutable=["attention", "intermediates"], capture_intermediates=True))(params, x)
    (amap,) = state["attention"]["maps"]
    inter = state["intermediates"]
    fused = "qkv" in inter
    proj = inter["qkv" if fused else "kv"]["__call__"][0]
    heads = amap.weights.shape[1]
    values = proj.reshape(*proj.shape[:3], 3 if fused else 2, heads, -1)[..., -1, :, :]
    return params["params"], out, amap, values


@pytest.mark.parametrize("name", ["global", "blocked", "windows", "subsampled"])
def test_rows_sum_to_one_and_weights_reproduce_the_output(name):
    params, out, amap, values = _run(_layers()[name])
    kind = {"global": "global", "subsampled": "subsampled"}.get(name, "blocked")
    assert amap.kind == kind and amap.query_hw == (H, W)
    assert amap.key_hw == ((2, 3) if name == "subsampled" else (H, W))
    assert amap.key_stride == ((2, 2) if name == "subsampled" else (1, 1))
    weights = np.asarray(amap.weights, np.float64)
    assert amap.weights.dtype == jnp.float32
    assert weights.shape[:4] == (2, values.shape[3], H, W)
    np.testing.assert_allclose(weights.sum((-2, -1)), 1.0, atol=1e-5)
    y = np.einsum("bhijkl,bklhd->bijhd", weights, np.asarray(values, np.float64))
    y = y.reshape(2, H, W, -1)
    if "proj" in params:  # SASA's layer has no output projection
        y = y @ params["proj"]["kernel"] + params["proj"]["bias"]
    np.testing.assert_allclose(np.asarray(out), y, atol=1e-4, rtol=1e-4)


def test_keys_outside_the_window_get_exactly_zero():
    """SASA 3x3 neighbourhoods: weight > 0 exactly on the in-image keys within one row and
    column of the query; 4x4 windows (LSA): exactly on the keys of the query's window."""
    _, _, amap, _ = _run(_layers()["blocked"])
    rows, cols = np.arange(H), np.arange(W)
    near = ((np.abs(rows[:, None] - rows[None, :]) <= 1)[:, None, :, None]
            & (np.abs(cols[:, None] - cols[None, :]) <= 1)[None, :, None, :])
    weights = np.asarray(amap.weights)
    assert np.all(weights[:, :, ~near] == 0.0) and np.all(weights[:, :, near] > 0.0)

    _, _, amap, _ = _run(_layers()["windows"])
    same = ((rows[:, None] // 4 == rows[None, :] // 4)[:, None, :, None]
            & (cols[:, None] // 4 == cols[None, :] // 4)[None, :, None, :])
    weights = np.asarray(amap.weights)
    assert np.all(weights[:, :, ~same] == 0.0) and np.all(weights[:, :, same] > 0.0)


def test_nothing_is_sown_at_init_or_by_default():
    layer = _layers()["global"]
    x = jnp.zeros((1, H, W, C))
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params"}
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    assert "attention" not in state


def test_attention_maps_of_a_model_in_call_order():
    model = Twins(depths=(2, 1, 1, 1), window_sizes=(4, 4, 4, 4), embed_dims=(8, 16, 24, 32),
                  num_heads=(2, 2, 3, 4), mlp_ratios=(4, 4, 4, 4), num_classes=5)
    x = jnp.zeros((1, 64, 96, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    variables = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), variables)
    maps = attention_maps(model, variables, x)
    assert [(m.path, m.kind) for m in maps] == [
        ("stage1/block0/attn", "blocked"), ("stage1/block1/attn", "subsampled"),
        ("stage2/block0/attn", "blocked"), ("stage3/block0/attn", "blocked"),
        ("stage4/block0/attn", "blocked"),
    ]
    assert maps[1].query_hw == (16, 24) and maps[1].key_hw == (2, 3)
    assert maps[1].key_stride == (8, 8) and maps[1].weights.shape == (1, 2, 16, 24, 2, 3)
    with pytest.raises(ValueError, match="NHWC"):
        attention_maps(model, variables, x[0])
