"""SASA ResNets (Ramachandran et al. 2019): attention stem, strided attention, models,
parameter counts against Table 1, configs."""

from __future__ import annotations

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_scalars, softmax

from hybrid_attn.models import get_model
from hybrid_attn.models.layers.attention_stem import AttentionStem
from hybrid_attn.models.layers.local_attention import LocalSelfAttention
from hybrid_attn.models.sasa import AttentionSpatial, SASAResNet

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shapes(model: nn.Module, shape: tuple[int, ...]) -> dict:
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _random_like(tree, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), tree
    )


# --- Attention stem -------------------------------------------------------------------


def brute_force_stem(x: np.ndarray, variables: dict, heads: int, window: int) -> np.ndarray:
    """Loops over every window-aligned block and every pixel of it (SASA Sec. 3.2):
    v_ab = sum_m softmax_m((emb_row[a] + emb_col[b]) . nu^m) W_V^m x_ab, attention within
    the block, eval-mode BatchNorm, then max over the block."""
    p = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), variables["params"])
    stats = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64),
                                   variables["batch_stats"])
    b, h, w, c = x.shape
    features = p["value"].shape[-1]
    d = features // heads
    out = np.zeros((b, h // window, w // window, features))
    for bi in range(h // window):
        for bj in range(w // window):
            q, k, v = [], [], []
            for a in range(window):
                for bb in range(window):
                    pix = x[:, bi * window + a, bj * window + bb]  # [B, C]
                    pos = p["position"]
                    mix = softmax((pos["emb_row"][a] + pos["emb_col"][bb]) @ pos["mixture"])
                    w_v = sum(mix[m] * p["value"][m] for m in range(len(mix)))
                    qk = pix @ p["qk"]["kernel"]
                    q.append(qk[:, :features].reshape(b, heads, d))
                    k.append(qk[:, features:].reshape(b, heads, d))
                    v.append((pix @ w_v).reshape(b, heads, d))
            q, k, v = np.stack(q, 1), np.stack(k, 1), np.stack(v, 1)  # [B, 16, heads, d]
            weights = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d))
            y = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, -1, features)
            y = (y - stats["norm"]["mean"]) / np.sqrt(stats["norm"]["var"] + 1e-5)
            y = y * p["norm"]["scale"] + p["norm"]["bias"]
            out[:, bi, bj] = y.max(1)
    return out


def test_attention_stem_matches_brute_force_on_non_square_input():
    stem = AttentionStem(features=8, num_heads=2, num_mixtures=3, embed_dim=5)
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    shapes = _shapes(stem, x.shape)
    variables = {"params": _random_like(shapes["params"], 1),
                 "batch_stats": _random_like(shapes["batch_stats"], 2)}
    variables["batch_stats"]["norm"]["var"] = np.abs(variables["batch_stats"]["norm"]["var"])
    got = jax.jit(lambda v, x: stem.apply(v, x, train=False))(variables, x)
    assert got.shape == (2, 2, 3, 8)
    np.testing.assert_allclose(np.asarray(got), brute_force_stem(x, variables, 2, 4),
                               atol=1e-4, rtol=1e-4)


def test_attention_stem_rejects_sizes_not_multiple_of_window():
    with pytest.raises(ValueError, match=r"multiples of its window 4; got shape \(1, 30, 32, 3\)"):
        _shapes(AttentionStem(), (1, 30, 32, 3))


# --- Strided attention ----------------------------------------------------------------


def test_strided_attention_is_attention_then_ceil_average_pool():
    """Odd maps round up, as the strided 1x1 shortcut conv does; padded cells don't count."""
    x = np.random.default_rng(3).normal(size=(1, 5, 7, 4)).astype(np.float32)
    op = AttentionSpatial(8, strides=2, num_heads=2, kernel_size=3)
    params = _random_like(_shapes(op, x.shape)["params"], 4, scale=0.5)
    got = np.asarray(jax.jit(lambda p, x: op.apply({"params": p}, x, train=False))(params, x))
    attn = LocalSelfAttention(8, num_heads=2, kernel_size=3)
    y = np.asarray(jax.jit(attn.apply)({"params": params["attn"]}, x))
    want = np.stack([np.stack([y[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((0, 1))
                               for j in range(4)]) for i in range(3)])[None]
    assert got.shape == (1, 3, 4, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)


# --- Models ---------------------------------------------------------------------------

TABLE1_MILLIONS = {26: 10.3, 38: 14.1, 50: 18.0}
# Measured with jax.eval_shape (documented in hybrid_attn/models/sasa.py).
CONV_STEM_COUNTS = {26: 10_331_264, 38: 14_173_384, 50: 18_015_504}
ATTENTION_STEM_COUNTS = {26: 10_323_200, 38: 14_165_320, 50: 18_007_440}
BLOCKS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}


@pytest.mark.parametrize("depth", [26, 38, 50])
def test_parameter_counts_against_table1(depth):
    """Pinned counts, within 0.1M of Table 1 (10.3 / 14.1 / 18.0M for both stems), and
    derived independently from the ResNet baseline: each block's 3x3 conv (9 w^2) becomes
    q/k/v (3 w^2) plus 2 relative tables of 7 x w/16."""
    # Parameter counts do not depend on the resolution: 32x32 traces faster than 224.
    count = lambda name: count_scalars(_shapes(get_model(name), (1, 32, 32, 3))["params"])
    conv, attn = count(f"sasa_resnet{depth}_convstem"), count(f"sasa_resnet{depth}")
    assert (conv, attn) == (CONV_STEM_COUNTS[depth], ATTENTION_STEM_COUNTS[depth])
    for n in (conv, attn):
        assert abs(n / 1e6 - TABLE1_MILLIONS[depth]) < 0.1
    resnet = count_scalars(_shapes(get_model(f"resnet{depth}"), (1, 32, 32, 3))["params"])
    widths = [64 * 2**s for s, n in enumerate(BLOCKS[depth]) for _ in range(n)]
    assert conv == resnet - sum(6 * w * w - 7 * w // 8 for w in widths)


def test_every_spatial_convolution_is_attention():
    shapes = {
        stem: _shapes(get_model(f"sasa_resnet26{stem}", width=16, num_classes=10),
                      (1, 32, 32, 3))["params"]
        for stem in ("", "_convstem")
    }
    for stem, params in shapes.items():
        spatial_kernels = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if "kernel" in jax.tree_util.keystr(path) and leaf.ndim == 4 and leaf.shape[0] > 1
        ]
        assert spatial_kernels == ([] if stem == "" else ["['stem']['conv']['kernel']"])
        for s, n in enumerate(BLOCKS[26]):
            for i in range(n):
                block = params[f"stage{s + 1}"][f"block{i}"]
                assert "conv2" not in block and "qkv" in block["spatial"]["attn"]
    assert set(shapes[""]["stem"]) == {"qk", "value", "position", "norm"}
    # The embeddings are position tables (no weight decay); the value matrices are not.
    assert set(shapes[""]["stem"]["position"]) == {"emb_row", "emb_col", "mixture"}
    assert shapes[""]["stem"]["value"].shape == (4, 3, 16)


def test_no_parameter_depends_on_the_resolution():
    """The relative tables are sized by the window, so 224 -> 384 fine-tuning (or any
    non-square input) loads the same checkpoint without resizing."""
    model = get_model("sasa_resnet26", width=16, num_classes=10)
    small = jax.tree_util.tree_map(jnp.shape, _shapes(model, (1, 32, 32, 3)))
    assert jax.tree_util.tree_map(jnp.shape, _shapes(model, (1, 96, 64, 3))) == small


def test_attention_stages_keep_convolutions_elsewhere():
    model = get_model("sasa_resnet26_convstem", width=16, attention_stages=(2, 3))
    params = _shapes(model, (1, 32, 32, 3))["params"]
    assert "conv2" in params["stage1"]["block0"] and "conv2" in params["stage2"]["block1"]
    assert "spatial" in params["stage3"]["block0"] and "spatial" in params["stage4"]["block0"]


def test_tiny_model_trains_and_evaluates():
    """Full attention model (attention stem, strided attention in stages 2-4) end to end:
    train mode updates the BatchNorm statistics and uses drop-path; eval is deterministic."""
    model = get_model("sasa_resnet26", stage_sizes=(1, 1, 1, 1), width=16, num_classes=10,
                      drop_path_rate=0.1)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
    shapes = _shapes(model, x.shape)  # random params: no separate init compile
    variables = {"params": _random_like(shapes["params"], 6, scale=0.1),
                 "batch_stats": jax.tree_util.tree_map(lambda s: np.ones(s.shape, np.float32),
                                                    shapes["batch_stats"])}

    @jax.jit
    def run(variables, x):
        train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.key(1)})
        return train_out, updates, model.apply(variables, x, train=False)

    train_out, updates, eval_out = run(variables, x)
    assert train_out.shape == eval_out.shape == (2, 10)
    assert train_out.dtype == eval_out.dtype == jnp.float32
    assert np.isfinite(np.asarray(train_out)).all() and np.isfinite(np.asarray(eval_out)).all()
    assert not np.allclose(np.asarray(train_out), np.asarray(eval_out))
    new_mean = np.asarray(updates["batch_stats"]["stem"]["norm"]["mean"])
    assert not np.allclose(new_mean, 1.0)


def test_compute_dtype_reaches_the_attention_layers():
    model = get_model("sasa_resnet26", width=16, num_classes=10, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 32, 32, 3))
    variables = _shapes(model, x.shape)
    _, state = jax.eval_shape(
        lambda v: model.apply(v, x, train=False, capture_intermediates=True), variables
    )
    inter = state["intermediates"]
    assert inter["stem"]["__call__"][0].dtype == jnp.bfloat16
    spatial = inter["stage2"]["block0"]["spatial"]
    assert spatial["attn"]["__call__"][0].dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(variables["params"])[0].dtype == jnp.float32


@pytest.mark.parametrize("depth", [26, 38, 50])
def test_registry_names(depth):
    for suffix, attention_stem in (("", True), ("_convstem", False)):
        model = get_model(f"sasa_resnet{depth}{suffix}")
        assert isinstance(model, SASAResNet)
        assert tuple(model.stage_sizes) == BLOCKS[depth]
        assert model.attention_stem is attention_stem


def test_attention_stem_model_rejects_unsupported_resolution():
    with pytest.raises(ValueError, match="multiples of its window 4"):
        _shapes(get_model("sasa_resnet26", width=16), (1, 30, 30, 3))


# --- Configs --------------------------------------------------------------------------


def _config(depth: int, arg: str | None = None):
    path = ROOT / "configs" / f"sasa_resnet{depth}.py"
    spec = importlib.util.spec_from_file_location(f"sasa_resnet{depth}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("depth", [26, 38, 50])
def test_configs(depth):
    c = _config(depth)
    assert c.model_name == f"sasa_resnet{depth}"
    assert (c.batch_size, c.num_epochs, c.data.image_size) == (4096, 90.0, 224)
    assert (c.optim.name, c.optim.nesterov, c.optim.momentum) == ("sgd", True, 0.9)
    assert (c.optim.learning_rate, c.optim.schedule, c.optim.ema_decay) == (1.6, "cosine", 0.9999)
    assert (c.optim.weight_decay, c.data.label_smoothing) == (1e-4, 0.1)
    get_model(c.model_name, **c.model)
    quick = _config(depth, "digits")
    assert (quick.data.name, quick.data.num_classes, quick.data.image_size) == ("digits", 10, 32)
    assert get_model(quick.model_name, **quick.model).block_size == 8
