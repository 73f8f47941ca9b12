"""ResNet baseline: parameter counts, timm golden, block and extension-point behaviour."""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_scalars

from hybrid_attn.convert import common
from hybrid_attn.convert.timm import convert_timm
from hybrid_attn.models import get_model
from hybrid_attn.models.layers.non_local import NonLocalBlock
from hybrid_attn.models.resnet import BottleneckBlock, ResNet

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"


def count_params(model: nn.Module, res: int = 224) -> int:
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), train=False))
    return count_scalars(shapes["params"])


def init_apply(model: nn.Module, x) -> tuple[dict, jax.Array]:
    """Jitted init + eval-mode apply of a small module (one compile each)."""
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x)
    return variables, jax.jit(functools.partial(model.apply, train=False))(variables, x)


def random_variables(model: nn.Module, x, seed: int = 0) -> dict:
    """Random variables of the right shapes without compiling ``init`` (its RNG code takes
    seconds to compile on CPU): kernels ~ N(0, 1/fan_in), BN around identity."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        std = 0.1 if len(leaf.shape) == 1 else np.prod(leaf.shape[:-1]) ** -0.5
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def load_golden(name: str) -> tuple[dict, np.ndarray, np.ndarray]:
    z = np.load(GOLDENS / f"{name}.npz")
    return {k[3:]: z[k] for k in z.files if k.startswith("sd/")}, z["x"], z["y"]


@pytest.mark.parametrize("name, millions", [
    ("resnet26", 13.7), ("resnet38", 19.6), ("resnet50", 25.6),  # SASA Table 1
    ("resnet101", 44.5), ("resnet152", 60.2),  # torchvision's published counts
])
def test_param_counts(name, millions):
    assert round(count_params(get_model(name)) / 1e6, 1) == millions


def test_resnet50_exact_count():
    assert count_params(get_model("resnet50")) == 25_557_032  # torchvision / timm resnet50


def test_matches_timm_resnet():
    sd, x, y = load_golden("resnet_tiny")
    # timm's 7x7 stem is 64 wide whatever the stage widths; the stem factory says so.
    model = ResNet((2, 1, 1, 1), num_classes=5, width=8, stem_width=64)
    variables = convert_timm("resnet_tiny", sd, model, x.shape)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    np.testing.assert_allclose(out, y, atol=1e-4, rtol=1e-4)


def test_converter_rejects_unknown_tensors():
    sd, x, _ = load_golden("resnet_tiny")
    sd["layer1.0.extra.weight"] = np.zeros(3, np.float32)
    model = ResNet((2, 1, 1, 1), num_classes=5, width=8, stem_width=64)
    with pytest.raises(ValueError, match="layer1.0.extra.weight"):
        convert_timm("resnet_tiny", sd, model, x.shape)


def test_tracked_state_dict_counts_reads_not_membership_tests():
    sd = common.TrackedStateDict({"a": 1, "b": 2, "bn.num_batches_tracked": 3})
    assert "b" in sd and sd["a"] == 1 and "bn.num_batches_tracked" not in sd
    with pytest.raises(ValueError, match=r"no place in X \(1\):\s+b$"):
        sd.check_all_used("X")


def test_fresh_block_is_identity_then_activation():
    """Zero-initialised last BN scale (Goyal et al. 2017): a new block is act(x)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 32))
    variables, out = init_apply(BottleneckBlock(8), x)
    assert "shortcut_conv" not in variables["params"]
    np.testing.assert_allclose(out, nn.relu(x), atol=1e-6)
    assert not np.allclose(out, x)


class _PoolSpatial(nn.Module):
    """A spatial op for the extension test: 1x1 projection then strided average pool."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Dense(self.features, name="proj")(x)
        return nn.avg_pool(x, (self.strides,) * 2, (self.strides,) * 2)


class _PatchStem(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.Conv(8, (4, 4), (4, 4), name="patchify")(x)


class _ExtendedResNet(ResNet):
    """The one extension mechanism: overridden stem and spatial-op methods (the non-local
    block comes from the base class's ``pre_block`` for ``non_local_stages``)."""

    def stem_factory(self):
        return _PatchStem

    def block_spatial(self, stage_index, block_index):
        return _PoolSpatial if (stage_index, block_index) == (1, 0) else None


def test_stem_spatial_and_non_local_extension_points():
    model = _ExtendedResNet((1, 2, 1, 1), num_classes=3, width=8, non_local_stages=(1,),
                            drop_path_rate=0.1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    variables = random_variables(model, x)
    p = variables["params"]
    assert set(p["stem"]) == {"patchify"}
    assert p["stage2"]["block0"]["spatial"]["proj"]["kernel"].shape == (16, 16)
    assert "conv2" not in p["stage2"]["block0"] and "conv2" in p["stage2"]["block1"]
    assert set(p["stage2"]) == {"block0", "nonlocal", "block1"}
    train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, state = train_apply(variables, x, rngs={"dropout": jax.random.PRNGKey(1)})
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    old, new = variables["batch_stats"]["stage4"], state["batch_stats"]["stage4"]
    assert not np.allclose(old["block0"]["bn1"]["var"], new["block0"]["bn1"]["var"])


def test_non_local_block_matches_brute_force():
    """Wang et al. 2018 Eq. 1-3 (embedded Gaussian, scaled): x + BN(W_z y)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8)).astype(np.float32)
    block = NonLocalBlock()
    variables, out = init_apply(block, x)
    np.testing.assert_allclose(out, x, atol=1e-6)

    bn_scale = np.linspace(0.5, 1.5, 8).astype(np.float32)
    variables["params"]["bn"]["scale"] = bn_scale
    out = np.asarray(jax.jit(functools.partial(block.apply, train=False))(variables, x))
    p = variables["params"]["attn"]
    tokens = x.reshape(2, 15, 8)
    qkv = tokens @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
    theta, phi, g = qkv[..., :4], qkv[..., 4:8], qkv[..., 8:]
    want = np.zeros_like(tokens)
    for b in range(2):
        for i in range(15):
            f = np.array([theta[b, i] @ phi[b, j] / 2.0 for j in range(15)])  # sqrt(4) = 2
            f = np.exp(f - f.max())
            y_i = (f / f.sum()) @ g[b]
            z = y_i @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
            want[b, i] = tokens[b, i] + bn_scale * z / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(out.reshape(2, 15, 8), want, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = get_model("resnet26", width=8, num_classes=3, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out, inter = jax.eval_shape(lambda v: model.apply(v, x, train=False,
                                                      capture_intermediates=True), variables)
    assert out.dtype == jnp.float32
    assert inter["intermediates"]["stage4"]["block0"]["__call__"][0].dtype == jnp.bfloat16


def test_rejects_non_image_input():
    with pytest.raises(ValueError, match="NHWC"):
        get_model("resnet26").init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)), train=False)


def test_config():
    spec = importlib.util.spec_from_file_location("resnet50_config", ROOT / "configs/resnet50.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c, quick = module.get_config(), module.get_config("digits")
    assert (c.model_name, c.data.image_size, c.num_epochs, c.optim.name) == (
        "resnet50", 224, 90.0, "sgd")
    assert (quick.data.name, quick.data.num_classes) == ("digits", 10)
    get_model(c.model_name, **c.model)
