"""CoAtNet (Dai et al. 2021): sizes against the paper's Table 3, logits against timm goldens
(goldens/generate_coatnet.py), and the errors a user meets first."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_scalars

from hybrid_attn.convert import timm_coatnet
from hybrid_attn.convert.timm import convert_timm
from hybrid_attn.models import get_model, resize_position_tables
from hybrid_attn.models.coatnet import CoAtNet
from hybrid_attn.models.layers import platform

GOLDENS = pathlib.Path(__file__).parent / "goldens"
IMAGE_224 = (1, 224, 224, 3)

# name: (parameters at 224 with our model = timm's coatnet_N_224, paper Table 3 in millions)
PARAMS = {
    "coatnet_0": (25_036_820, 25), "coatnet_1": (42_225_776, 42), "coatnet_2": (74_684_744, 75),
    "coatnet_3": (166_966_264, 168), "coatnet_4": (275_425_288, 275),
}


def _shapes(model, image_shape=IMAGE_224):
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_timm_and_the_paper(name):
    exact, paper_millions = PARAMS[name]
    n = count_scalars(_shapes(get_model(name))["params"])
    assert n == exact
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01


def _macs(jaxpr) -> int:
    """Multiply-adds of every convolution and matrix product, as the paper counts FLOPs.
    Trace under ``platform.all_platforms()``: the CPU forms of some ops (the depthwise
    convolution's shifted multiply-adds) have no convolution to count."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            per_output = kernel[spec[1]] * np.prod([kernel[i] for i in spec[2:]])
            total += int(np.prod(eqn.outvars[0].aval.shape) * per_output)
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += int(np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract]))
        # A cond runs one of its branches: platform_dependent's forms of the same op.
        for sub in eqn.params.values():
            branches = [b for b in (sub if isinstance(sub, tuple) else (sub,))
                        if isinstance(b, jex.core.ClosedJaxpr)]
            total += max((_macs(b.jaxpr) for b in branches), default=0)
    return total


def test_stride_location_sets_flops_not_parameters():
    """Striding the first 1x1 conv gives the paper's 4.2G for CoAtNet-0; striding the
    depthwise conv (published code) costs 7-10% more with identical parameters."""
    macs, counts = {}, {}
    for stride_at in ("expand", "depthwise"):
        model = get_model("coatnet_0", stride_at=stride_at)
        variables = _shapes(model)
        counts[stride_at] = count_scalars(variables)
        with platform.all_platforms():
            jaxpr = jax.make_jaxpr(lambda v, x, m=model: m.apply(v, x, train=False))(
                variables, jax.ShapeDtypeStruct(IMAGE_224, jnp.float32))
        macs[stride_at] = _macs(jaxpr.jaxpr)
    assert counts["expand"] == counts["depthwise"]
    assert abs(macs["expand"] / 4.2e9 - 1) < 0.02
    assert 1.07 < macs["depthwise"] / macs["expand"] < 1.10


@pytest.mark.parametrize("name,paper_gmacs", [("coatnet_1", 8.4), ("coatnet_2", 15.7),
                                               ("coatnet_3", 34.7)])
def test_larger_models_match_the_papers_flops(name, paper_gmacs):
    """Table 3's FLOPs (multiply-adds) at 224 with the paper's stride placement."""
    model = get_model(name, stride_at="expand")
    with platform.all_platforms():
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
            _shapes(model), jax.ShapeDtypeStruct(IMAGE_224, jnp.float32))
    assert abs(_macs(jaxpr.jaxpr) / (paper_gmacs * 1e9) - 1) < 0.02


def _golden(name: str):
    golden = np.load(GOLDENS / f"coatnet_{name}.npz")
    config = {k: tuple(v) if isinstance(v, list) else v
              for k, v in json.loads(str(golden["config"])).items()}
    state_dict = {k[3:]: golden[k] for k in golden if k.startswith("sd/")}
    return golden, config, state_dict


_APPLY: dict = {}


def _apply(model, variables, x):
    """Eval-mode forward, compiled once per model and input shape at XLA's lowest
    optimisation level (a tiny model compiles in half the time and runs as fast)."""
    key = (model, x.shape)
    if key not in _APPLY:
        _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
            variables, x).compile({"xla_backend_optimization_level": 0})
    return np.asarray(_APPLY[key](variables, x))


@pytest.mark.parametrize("stride_at", ["depthwise", "expand"])
def test_matches_timm_logits(stride_at):
    golden, config, state_dict = _golden("tiny")
    x = golden[f"{stride_at}/input"]
    model = CoAtNet(**config, stride_at=stride_at)
    variables = convert_timm("coatnet_tiny", state_dict, model, image_shape=x.shape)
    np.testing.assert_allclose(_apply(model, variables, x), golden[f"{stride_at}/logits"],
                               rtol=1e-4, atol=1e-4)


def test_matches_timm_logits_at_a_non_square_size():
    golden, config, state_dict = _golden("nonsquare")
    x = golden["depthwise/input"]
    assert x.shape[1:3] == (64, 96)
    model = CoAtNet(**config)
    with pytest.raises(ValueError, match="not from a square map; pass image_shape"):
        timm_coatnet.convert(state_dict, model)
    variables = timm_coatnet.convert(state_dict, model, image_shape=x.shape)
    np.testing.assert_allclose(_apply(model, variables, x), golden["depthwise/logits"],
                               rtol=1e-4, atol=1e-4)


def test_tables_from_another_size_fail_clearly_and_resize():
    golden, config, state_dict = _golden("tiny")
    model = CoAtNet(**config)
    variables = timm_coatnet.convert(state_dict, model)
    x = jnp.zeros((2, 64, 96, 3))
    with pytest.raises(ValueError, match=r"stage3/block0/attn/position/relative_bias_table has "
                                         r"shape \(7, 7, 2\) but the 4x6 feature map of this "
                                         r"input needs \(7, 11, 2\).*resize_position_tables"):
        jax.eval_shape(lambda: model.apply(variables, x, train=False))
    params = resize_position_tables(variables["params"], model, x.shape)
    assert params["stage4"]["block1"]["attn"]["position"]["relative_bias_table"].shape == (3, 5, 3)
    logits = _apply(model, {**variables, "params": params}, x)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_input_sizes_and_intermediate_features():
    model = CoAtNet(depths=(1, 1, 1, 1), widths=(8, 8, 32, 32), stem_width=8, num_classes=3)
    with pytest.raises(ValueError, match="multiples of 32 .* got 64x80"):
        _shapes(model, (1, 64, 80, 3))
    variables = _shapes(model, (2, 64, 96, 3))
    logits, state = jax.eval_shape(lambda v: model.apply(
        v, jnp.zeros((2, 64, 96, 3)), train=False, mutable=["intermediates"]), variables)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    features = {k: v["output"][0].shape for k, v in state["intermediates"].items()}
    assert features == {"stage1": (2, 16, 24, 8), "stage2": (2, 8, 12, 8),
                        "stage3": (2, 4, 6, 32), "stage4": (2, 2, 3, 32)}


def test_train_mode_and_bfloat16_trace():
    model = CoAtNet(depths=(1, 1, 1, 1), widths=(8, 8, 32, 32), stem_width=8, num_classes=3,
                    drop_path_rate=0.2, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 32, 32, 3))
    variables = _shapes(model, x.shape)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype(np.float32)}
    logits, state = jax.eval_shape(lambda v: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}),
        variables)
    assert logits.dtype == jnp.float32
    assert jax.tree_util.tree_structure(state["batch_stats"]) == jax.tree_util.tree_structure(
        variables["batch_stats"])


def test_converter_rejects_unmapped_tensors():
    _, config, state_dict = _golden("tiny")
    with pytest.raises(ValueError,
                       match=r"no place in CoAtNet \(1\):\s+stages\.0\.blocks\.0\.extra\.weight"):
        timm_coatnet.convert({**state_dict, "stages.0.blocks.0.extra.weight": np.zeros(1)},
                             CoAtNet(**config))
