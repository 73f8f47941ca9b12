"""BoTNet: timm goldens (block and whole model), parameter counts against the paper,
feature-map-size checks and table resizing, ablation switches, configs."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_resnet import ROOT, count_params, load_golden, random_variables

from hybrid_attn.convert.timm import convert_timm
from hybrid_attn.convert.timm_botnet import convert_block
from hybrid_attn.models import get_model, resize_position_tables
from hybrid_attn.models.botnet import S1_RESOLUTIONS, BoTAttention
from hybrid_attn.models.resnet import BottleneckBlock

# The tiny ByobNets of tests/goldens/generate_botnet.py: widths 8..64, blocks 1,1,2,2.
TINY = dict(stage_sizes=(1, 1, 2, 2), width=8, num_classes=5)


@pytest.mark.parametrize("stride, scale_query", [(1, False), (2, True)])
def test_bot_block_matches_timm(stride, scale_query):
    """timm SelfAttnBlock + BottleneckAttn; stride 2 = attention then 2x2 average pool."""
    sd, x, y = load_golden(f"botnet_block_s{stride}")
    params, stats = convert_block(sd, "")
    block = BottleneckBlock(16, stride, functools.partial(
        BoTAttention, scale_position_query=scale_query))
    out = block.apply({"params": params, "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(out, y, atol=1e-4, rtol=1e-4)
    # The query-scaling flag matters: the other setting must not match.
    wrong = BottleneckBlock(16, stride, functools.partial(
        BoTAttention, scale_position_query=not scale_query))
    out = wrong.apply({"params": params, "batch_stats": stats}, x, train=False)
    assert np.abs(out - y).max() > 1e-3


@pytest.mark.parametrize("golden, name, overrides", [
    ("botnet_tiny", "botnet50", dict(scale_position_query=False)),
    ("botnet_s1_tiny", "botnet_s1_t3", {}),
])
def test_model_matches_timm(golden, name, overrides):
    """Whole ByobNets on a non-square 64x96 input (c5 maps 4x6 -> 2x3, or 4x6 for S1)."""
    sd, x, y = load_golden(golden)
    model = get_model(name, **TINY, **overrides)
    variables = convert_timm(name, sd, model, x.shape)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    np.testing.assert_allclose(out, y, atol=1e-4, rtol=1e-4)


def test_botnet50_param_count():
    n = count_params(get_model("botnet50"))
    assert n == 20_852_008
    assert abs(n / 20.8e6 - 1) < 0.01  # the paper's 20.8M


# The paper's T-table (SE in every block) and the counts without SE in the attention
# blocks (/work/shared/reference/paper_tables.md), both in millions at the T resolution.
T_TABLE = {"botnet_s1_t3": (33.5, 30.5), "botnet_s1_t4": (54.7, 51.7),
           "botnet_s1_t5": (75.1, 69.1), "botnet_s1_t6": (53.9, 47.9),
           "botnet_s1_t7": (75.1, 69.2)}


def _se_in_attention_blocks(params) -> int:
    return sum(int(np.prod(leaf.shape)) for name, stage in params.items()
               if name.startswith("stage") for block in stage.values() if "spatial" in block
               for leaf in jax.tree_util.tree_leaves(block.get("se", {})))


@pytest.mark.parametrize("name", sorted(T_TABLE))
def test_s1_param_counts(name):
    """Built as the text says (SE only in conv blocks) we match the SE-free counts; with
    ``se_in_spatial_blocks=True`` we are within 1% of the T-table."""
    res = S1_RESOLUTIONS[name]
    x = jnp.zeros((1, res, res, 3))
    model = get_model(name, se_in_spatial_blocks=True)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))["params"]
    with_se = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    paper, without = T_TABLE[name]
    assert abs(with_se / (paper * 1e6) - 1) < 0.01
    assert round((with_se - _se_in_attention_blocks(params)) / 1e6, 1) == without
    if name == "botnet_s1_t3":  # the default partial is the SE-free build
        assert count_params(get_model(name), res) == with_se - _se_in_attention_blocks(params)


def test_s1_layout():
    """c5 unstrided (attention on the 1/16 map: 14x14 at 224), SE only in conv blocks."""
    params = jax.eval_shape(lambda: get_model("botnet_s1_t3").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))["params"]
    for name, block in params["stage4"].items():
        assert block["spatial"]["attn"]["position"]["rel_height"].shape == (27, 128), name
        assert "se" not in block
    assert all("se" in b and "conv2" in b for s in ("stage1", "stage2", "stage3")
               for b in params[s].values())


def test_ablation_switches():
    x = jnp.zeros((1, 64, 64, 3))

    def params(**kw):
        model = get_model("botnet50", width=8, num_classes=5, **kw)
        return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))["params"]

    c4c5 = params(attention_stages=(2, 3))
    assert all("spatial" in b for b in c4c5["stage3"].values())
    assert all("conv2" in b for b in params()["stage3"].values())
    absolute = params(position="absolute")["stage4"]["block1"]["spatial"]["attn"]
    assert set(absolute["position"]) == {"abs_height", "abs_width"}
    assert set(params(position="none")["stage4"]["block1"]["spatial"]["attn"]) == {"qkv"}
    assert "nonlocal" in params(non_local_stages=(2,))["stage3"]
    with pytest.raises(ValueError, match="Unknown position"):
        params(position="rel")


def test_input_size_mismatch_and_resize():
    """Tables built for 64x64 reject a 96x64 input by name; resized tables accept it."""
    model = get_model("botnet50", width=8, num_classes=5)
    x = jnp.zeros((1, 64, 64, 3))
    variables = random_variables(model, x)
    new = jnp.zeros((1, 96, 64, 3))
    with pytest.raises(ValueError, match=r"stage4/block0/spatial/attn/position/rel_height has "
                                         r"shape \(7, 16\) but the 6x4 feature map of this "
                                         r"input needs \(11, 16\).*resize_position_tables"):
        jax.eval_shape(functools.partial(model.apply, train=False), variables, new)
    resized = dict(variables, params=resize_position_tables(variables["params"], model, new.shape))
    pos = resized["params"]["stage4"]["block0"]["spatial"]["attn"]["position"]
    assert pos["rel_height"].shape == (11, 16) and pos["rel_width"].shape == (7, 16)
    block1 = resized["params"]["stage4"]["block1"]["spatial"]["attn"]
    assert block1["position"]["rel_height"].shape[0] == 5
    old = variables["params"]["stage4"]["block0"]["spatial"]["attn"]["position"]["rel_width"]
    np.testing.assert_array_equal(pos["rel_width"], old)  # unchanged axis kept exactly
    np.testing.assert_array_equal(resized["params"]["head"]["kernel"],
                                  variables["params"]["head"]["kernel"])
    out = jax.eval_shape(functools.partial(model.apply, train=False), resized, new)
    assert out.shape == (1, 5)


def test_odd_map_cannot_be_pooled():
    model = get_model("botnet50", width=8, num_classes=5)
    with pytest.raises(ValueError, match="even feature map"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 80, 80, 3)),
                                          train=False))


@pytest.mark.parametrize("name", ["botnet50", *sorted(S1_RESOLUTIONS)])
def test_configs(name):
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c, quick = module.get_config(), module.get_config("digits")
    assert c.model_name == name
    assert c.data.image_size == S1_RESOLUTIONS.get(name, 224)
    assert (quick.data.name, quick.data.image_size) == ("digits", 32)
    get_model(c.model_name, **c.model)


@pytest.mark.parametrize("position", ["relative", "absolute"])
def test_bfloat16_compute(position):
    """bf16 activations through the attention, float32 parameters and logits."""
    model = get_model("botnet50", width=8, num_classes=5, dtype=jnp.bfloat16, position=position)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out, inter = jax.eval_shape(lambda v: model.apply(v, x, train=False,
                                                      capture_intermediates=True), variables)
    assert out.dtype == jnp.float32
    spatial = inter["intermediates"]["stage4"]["block1"]["spatial"]["__call__"][0]
    assert spatial.dtype == jnp.bfloat16
