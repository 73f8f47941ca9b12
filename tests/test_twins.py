"""Twins-PCPVT / Twins-SVT: published parameter counts, timm parity on goldens, and the
semantics of LSA, GSA and the PEG against brute-force references written here."""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import softmax

from hybrid_attn.convert.timm import convert_timm
from hybrid_attn.models import get_model
from hybrid_attn.models.layers.attention import Attention, Blocked, Subsampled
from hybrid_attn.models.layers.norm import LayerNorm
from hybrid_attn.models.layers.position_encoding import PositionEncodingGenerator
from hybrid_attn.models.layers.regularization import DropPath
from hybrid_attn.models.twins import Twins, TwinsBlock

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"

# Exact counts from the authors' training logs (n_parameters), equal to timm's.
PUBLISHED_PARAMS = {
    "twins_pcpvt_s": 24_106_216,
    "twins_pcpvt_b": 43_828_456,
    "twins_pcpvt_l": 60_989_672,
    "twins_svt_s": 24_060_776,
    "twins_svt_b": 56_070_952,
    "twins_svt_l": 99_271_400,
}

TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 3, 4), mlp_ratios=(4, 4, 4, 4),
            num_classes=5)


def _shapes(model: nn.Module, image_shape=(1, 224, 224, 3)):
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))


def _calls(model: nn.Module, image_shape=(1, 224, 224, 3)) -> list[nn.Module]:
    """Every module ``__call__`` while tracing ``model.init`` (no compute), in call order."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            calls.append(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _shapes(model, image_shape)
    return calls


def _init(module: nn.Module, x: np.ndarray, seed: int = 0, **kw) -> dict:
    """Random parameters for ``module`` on input ``x`` without running it: fan-in scaled
    kernels, LayerNorm scales around 1 and non-zero biases (a swapped tensor shows)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(x), **kw))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        return (name == "scale") + 0.3 * rng.normal(size=shape)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


# XLA's cheap CPU pipeline: the tiny test models compile about twice as fast.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
    """``fn(*args)`` compiled once with :data:`_FAST_COMPILE`."""
    return np.asarray(jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args))


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One query ``[heads, d]`` over keys/values ``[n, heads, d]`` -> ``[heads, d]``."""
    w = softmax(np.einsum("hd,nhd->hn", q, k) / np.sqrt(q.shape[-1]))
    return np.einsum("hn,nhd->hd", w, v)


def _dense(p: dict, x: np.ndarray) -> np.ndarray:
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_equals_published(name):
    shapes = _shapes(get_model(name))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name,lsa", [("twins_pcpvt_s", False), ("twins_svt_s", True)])
def test_stage_layout_one_peg_after_first_block(name, lsa):
    """Per stage: patch_embed, block0, peg, block1, ... (one PEG, after the first block);
    SVT alternates LSA (even blocks) and GSA (odd blocks), PCPVT is GSA throughout."""
    model = get_model(name)
    calls = _calls(model)
    for k, depth in enumerate(model.depths):
        stage = f"stage{k + 1}"
        children = [m.name for m in calls if m.path[:-1] == (stage,)]
        expected = ["patch_embed", "block0", "peg"] + [f"block{i}" for i in range(1, depth)]
        assert children == expected
        attn = [type(m.pattern) for m in calls if m.path[:1] == (stage,)
                and isinstance(m, Attention)]
        kinds = [Blocked if lsa and i % 2 == 0 else Subsampled for i in range(depth)]
        assert attn == kinds
    params = _shapes(model)["params"]
    assert [sum(key == "peg" for key in params[f"stage{k + 1}"]) for k in range(4)] == [1] * 4


def test_layer_norm_epsilons_are_published():
    """1e-5 in patch embeddings and after the GSA sub-sampling conv, 1e-6 elsewhere."""
    eps = {m.path: m.epsilon for m in _calls(get_model("twins_svt_s"))
           if isinstance(m, LayerNorm)}
    for path, e in eps.items():
        published = 1e-5 if path[-2:] in {("patch_embed", "norm"), ("attn", "norm")} else 1e-6
        assert e == published, path
    assert eps[("stage1", "block1", "attn", "norm")] == 1e-5
    assert eps[("norm",)] == 1e-6


def test_too_small_or_malformed_input_raises():
    model = Twins(depths=(1, 1, 1, 1), **TINY)
    assert model.min_input_size() == 32
    with pytest.raises(ValueError, match=r"at least 32x32.*got 28x40"):
        _shapes(model, (1, 28, 40, 3))
    with pytest.raises(ValueError, match="NHWC"):
        _shapes(model, (28, 40, 3))


# ------------------------------------------------------------------ layer semantics


def _lsa(mask_padding: bool = True) -> Attention:
    """LSA as TwinsBlock builds it (window 7, 2 heads, 6 channels)."""
    return Attention(num_heads=2, out_features=6,
                     pattern=Blocked(7, padding="mask" if mask_padding else "zero_tokens"))


def _brute_force_lsa(x: np.ndarray, p: dict, heads: int, ws: int) -> np.ndarray:
    """Attention of each pixel over the pixels of its ``ws x ws`` window, by loops."""
    b, h, w, c = x.shape
    d = c // heads
    qkv = _dense(p["qkv"], x).reshape(b, h, w, 3, heads, d)
    out = np.zeros((b, h, w, heads, d))
    for i in range(h):
        for j in range(w):
            keys = [(a, e) for a in range(h) for e in range(w)
                    if a // ws == i // ws and e // ws == j // ws]
            for n in range(b):
                k = np.stack([qkv[n, a, e, 1] for a, e in keys])
                v = np.stack([qkv[n, a, e, 2] for a, e in keys])
                out[n, i, j] = _attend(qkv[n, i, j, 0], k, v)
    return _dense(p["proj"], out.reshape(b, h, w, c))


@pytest.mark.parametrize("hw", [(12, 9), (5, 9)])
def test_lsa_masked_equals_brute_force_windows(hw):
    """12x9 with window 7: windows of 7x7, 7x2, 5x7, 5x2 real pixels; 5x9: side < window."""
    x = np.random.default_rng(0).normal(size=(2, *hw, 6))
    lsa = _lsa()
    p = _init(lsa, x)
    got = lsa.apply({"params": p}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, _brute_force_lsa(x, p, 2, 7), atol=1e-5)


def test_lsa_published_padding_equals_brute_force_on_zero_padded_tokens():
    """``mask_padding=False``: zero tokens appended before ``qkv`` join every window."""
    x = np.random.default_rng(1).normal(size=(2, 12, 9, 6))
    lsa = _lsa(mask_padding=False)
    p = _init(lsa, x)
    got = lsa.apply({"params": p}, jnp.asarray(x, jnp.float32))
    padded = np.pad(x, ((0, 0), (0, 2), (0, 5), (0, 0)))
    want = _brute_force_lsa(padded, p, 2, 7)[:, :12, :9]
    np.testing.assert_allclose(got, want, atol=1e-5)
    masked = _lsa().apply(
        {"params": p}, jnp.asarray(x, jnp.float32))
    assert np.abs(np.asarray(masked) - want).max() > 1e-2


@pytest.mark.parametrize("sr", [1, 2])
def test_gsa_equals_brute_force_global_attention(sr):
    """sr = 1 is global self-attention; sr = 2 attends to the 2x2-conv + LayerNorm map
    (5x7 -> 2x3 keys, remainders dropped like the published conv)."""
    x = np.random.default_rng(2).normal(size=(2, 5, 7, 6))
    gsa = Attention(num_heads=3, out_features=6, pattern=Subsampled(sr))
    p = _init(gsa, x)
    assert set(p) == ({"q", "kv", "proj"} | ({"sr", "norm"} if sr > 1 else set()))
    got = gsa.apply({"params": p}, jnp.asarray(x, jnp.float32))
    b, h, w, c = x.shape
    src = x
    if sr > 1:
        kern = np.asarray(p["sr"]["kernel"], np.float64)
        src = np.zeros((b, h // sr, w // sr, c))
        for i in range(h // sr):
            for j in range(w // sr):
                patch = x[:, i * sr:(i + 1) * sr, j * sr:(j + 1) * sr]
                src[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kern) + p["sr"]["bias"]
        mu, var = src.mean(-1, keepdims=True), src.var(-1, keepdims=True)
        src = (src - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    q = _dense(p["q"], x).reshape(b, h * w, 3, 2)
    kv = _dense(p["kv"], src).reshape(b, -1, 2, 3, 2)
    out = np.stack([[_attend(q[n, t], kv[n, :, 0], kv[n, :, 1]) for t in range(h * w)]
                    for n in range(b)])
    want = _dense(p["proj"], out.reshape(b, h, w, c))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_peg_is_input_plus_zero_padded_depthwise_conv():
    x = np.random.default_rng(3).normal(size=(2, 4, 5, 3))
    peg = PositionEncodingGenerator()
    p = _init(peg, x)
    kern = p["proj"]["kernel"]
    assert kern.shape == (3, 3, 1, 3)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = x + p["proj"]["bias"]
    for i in range(4):
        for j in range(5):
            want[:, i, j] += np.einsum("bhwc,hwc->bc", padded[:, i:i + 3, j:j + 3], kern[:, :, 0])
    np.testing.assert_allclose(peg.apply({"params": p}, jnp.asarray(x, jnp.float32)), want,
                               atol=1e-5)


# --------------------------------------------------------------------- timm parity


@functools.cache
def _golden(family: str) -> tuple[dict, dict, dict]:
    data = np.load(GOLDENS / f"twins_{family}.npz")
    config = json.loads(str(data["config"]))
    state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    cases = {c: (data[f"{c}/input"], data[f"{c}/logits"]) for c in ("square", "nonsquare")}
    return config, state_dict, cases


def _golden_logits(family: str, case: str, mask_padding: bool) -> tuple[np.ndarray, np.ndarray]:
    config, state_dict, cases = _golden(family)
    x, want = cases[case]
    model = Twins(**config, lsa_mask_padding=mask_padding)
    variables = convert_timm(f"twins_{family}", state_dict, model, image_shape=x.shape)
    return _run(functools.partial(model.apply, train=False), variables, x), want


@pytest.mark.parametrize("family", ["pcpvt", "svt"])
@pytest.mark.parametrize("case", ["square", "nonsquare"])
def test_logits_match_timm(family, case):
    """SVT square: maps divisible by every window, default (masked) model. SVT nonsquare:
    no map divisible, published padding flag. PCPVT: any flag (no LSA)."""
    got, want = _golden_logits(family, case, mask_padding=case == "square")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_masked_lsa_departs_from_published_only_on_padded_maps():
    got, want = _golden_logits("svt", "nonsquare", mask_padding=True)
    assert np.abs(got - want).max() > 1e-2


def test_converter_rejects_mismatched_state_dicts():
    config, state_dict, cases = _golden("svt")
    model = Twins(**config)
    missing = {k: v for k, v in state_dict.items() if k != "blocks.2.1.attn.kv.weight"}
    with pytest.raises(ValueError, match="blocks.2.1.attn.kv.weight"):
        convert_timm("twins_svt", missing, model, image_shape=(1, 64, 64, 3))
    extra = dict(state_dict, **{"blocks.3.2.norm1.weight": state_dict["norm.weight"]})
    with pytest.raises(ValueError, match="blocks.3.2.norm1.weight"):
        convert_timm("twins_svt", extra, model, image_shape=(1, 64, 64, 3))


# --------------------------------------------------------------- training and dtype


def test_drop_path_rates_rise_linearly_and_drop_in_training():
    model = get_model("twins_svt_s", drop_path_rate=0.2)
    rates = [m.rate for m in _calls(model) if isinstance(m, DropPath)]
    assert rates[::2] == rates[1::2]  # both branches of a block share its rate
    np.testing.assert_allclose(rates[::2], np.linspace(0, 0.2, sum(model.depths)))
    x = np.random.default_rng(4).normal(size=(4, 8, 8, 8)).astype(np.float32)
    block = TwinsBlock(num_heads=2, mlp_ratio=4, sr_ratio=2, drop_path_rate=0.5)
    v = {"params": _init(block, x, train=False)}
    train = lambda v, x, key: block.apply(v, x, train=True, rngs={"dropout": key})  # noqa: E731
    a, b = (_run(train, v, x, jax.random.PRNGKey(i)) for i in (0, 1))
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-3
    assert np.abs(a - _run(functools.partial(block.apply, train=False), v, x)).max() > 1e-3


def test_bfloat16_compute_keeps_float32_logits():
    config, state_dict, cases = _golden("pcpvt")
    x, want = cases["nonsquare"]
    model = Twins(**config, dtype=jnp.bfloat16)
    variables = convert_timm("twins_pcpvt", state_dict, model, image_shape=x.shape)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    got = _run(functools.partial(model.apply, train=False), variables, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


# ------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,rate", [("pcpvt_s", 0.2), ("pcpvt_b", 0.3), ("pcpvt_l", 0.5),
                                       ("svt_s", 0.2), ("svt_b", 0.3), ("svt_l", 0.5)])
def test_configs_follow_the_paper_recipe(name, rate):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"twins_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.model_name == f"twins_{name}" and c.model.drop_path_rate == rate
    assert c.optim.learning_rate == pytest.approx(5e-4 * c.batch_size / 512)
    assert (c.num_epochs, c.optim.weight_decay, c.optim.warmup_epochs) == (300, 0.05, 5)
    assert (c.data.mixup_alpha, c.data.cutmix_alpha, c.data.label_smoothing) == (0.8, 1.0, 0.1)
    d = module.get_config("digits")
    assert d.data.name == "digits"
    assert d.data.image_size >= get_model(d.model_name).min_input_size()
