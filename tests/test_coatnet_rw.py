"""timm's rw CoAtNets (models/coatnet_rw.py): every variant's config at reduced size against
timm goldens (goldens/generate_coatnet_rw.py), full-size parameter counts against timm's,
and the rmlp bias at another resolution."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_scalars

from hybrid_attn.convert import common, from_timm, timm_coatnet
from hybrid_attn.convert.pretrained import import_timm
from hybrid_attn.models import get_model
from hybrid_attn.models.layers.relative_mlp import log_offsets
from hybrid_attn.optim import decay_mask

GOLDENS = pathlib.Path(__file__).parent / "goldens"
GOLDEN = np.load(GOLDENS / "coatnet_rw.npz")
CONFIG = json.loads(str(GOLDEN["config"]))
TIMM = json.loads((GOLDENS / "coatnet_rw_timm.json").read_text())


def _ours(case: str) -> str:
    """Our variant name for a golden case (``"0_rw"`` -> ``"coatnet_0_rw"``)."""
    return CONFIG["cases"][case]


def _reduced(case: str):
    s = CONFIG["sizes"]
    return get_model(_ours(case), depths=tuple(s["depths"]), widths=tuple(s["embed_dim"]),
                     stem_widths=tuple(s["stem_width"]), head_dim=s["dim_head"],
                     rel_pos_dim=s["rel_pos_dim"], num_classes=s["num_classes"])


def _state_dict(case: str) -> dict[str, np.ndarray]:
    """The case's timm state dict, split back out of its one flat float16 array."""
    flat, out, start = GOLDEN[f"{case}/weights"].astype(np.float32), {}, 0
    for name, shape in CONFIG["index"][case]:
        size = int(np.prod(shape))
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    assert start == flat.size
    return out


def _logits(model, variables, x) -> np.ndarray:
    """Eval-mode forward at XLA's lowest optimisation level (tiny models compile faster)."""
    f = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    return np.asarray(f.compile({"xla_backend_optimization_level": 0})(variables, x))


@pytest.mark.parametrize("case", sorted(CONFIG["cases"]))
def test_matches_timm_logits(case):
    x = GOLDEN["input"].astype(np.float32)
    assert x.shape[1:3] == (64, 96)
    model = _reduced(case)
    variables = timm_coatnet.convert(_state_dict(case), model, image_shape=x.shape)
    np.testing.assert_allclose(_logits(model, variables, x), GOLDEN[f"{case}/logits"],
                               rtol=1e-4, atol=1e-4)


def test_mlp_bias_serves_another_resolution_unchanged():
    """The rmlp weights at 64x64 (as timm's 384 model reuses its 224 weights): no table to
    resize, and timm's logits at that size."""
    x = GOLDEN["input_square"].astype(np.float32)
    model = _reduced("rmlp_2_rw")
    variables = timm_coatnet.convert(_state_dict("rmlp_2_rw"), model)
    np.testing.assert_allclose(_logits(model, variables, x), GOLDEN["rmlp_2_rw/logits_square"],
                               rtol=1e-4, atol=1e-4)
    assert get_model("coatnet_rmlp_2_rw_384") == get_model("coatnet_rmlp_2_rw")
    # The bias MLP sits in the position scope: like timm, no weight decay on it.
    mask = decay_mask(variables["params"])["stage3"]["block0"]
    assert not mask["attn"]["position"]["fc1"]["kernel"] and mask["mlp"]["fc1"]["kernel"]


def test_log_offsets_are_timms_cr_coordinates():
    """``sign(d) log(1 + |d|)`` of row and column offsets -(n-1) .. n-1, rows first."""
    coords = log_offsets(2, 3)
    assert coords.shape == (3, 5, 2)
    np.testing.assert_allclose(coords[:, 0, 0], [-np.log(2), 0, np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(coords[1, :, 1], [-np.log(3), -np.log(2), 0, np.log(2),
                                                 np.log(3)], rtol=1e-6)
    assert np.all(coords[:, :, 0] == coords[:, :1, 0]) and np.all(coords[1, 2] == 0)


@pytest.mark.parametrize("timm_name", sorted(TIMM))
def test_parameter_counts_match_timm(timm_name):
    """Full size, at timm's default class count (11821 for ``coatnet_3_rw_224``)."""
    facts = TIMM[timm_name]
    model = get_model(timm_name.removesuffix("_224"), num_classes=facts["num_classes"])
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
    assert count_scalars(shapes["params"]) == facts["params"]


def test_train_mode_updates_transformer_batch_norms():
    """``bn_0``'s transformer and final BatchNorms are ``batch_stats`` like the MBConv ones,
    and a train step (drop path on) traces for it and for the ConvNeXt model."""
    x = jnp.zeros((2, 64, 96, 3))
    for case in ("bn_0_rw", "coatnext_nano_rw"):
        model = _reduced(case).clone(drop_path_rate=0.2, dtype=jnp.bfloat16)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x, train=False))
        logits, state = jax.eval_shape(lambda v, m=model: m.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}),
            variables)
        assert logits.dtype == jnp.float32
        assert (jax.tree_util.tree_structure(state.get("batch_stats"))
                == jax.tree_util.tree_structure(variables.get("batch_stats")))
    assert "batch_stats" not in variables  # coatnext: LayerNorms only
    common.check_shapes(timm_coatnet.convert(_state_dict("coatnext_nano_rw"), model,
                                             image_shape=x.shape), variables)
    stats = jax.eval_shape(lambda: _reduced("bn_0_rw").init(
        jax.random.PRNGKey(0), x, train=False))["batch_stats"]
    assert set(stats["stage3"]["block0"]) == {"norm1", "norm2"}
    assert set(stats) == {"stem", "stage1", "stage2", "stage3", "stage4", "norm"}


def test_converter_rejects_unmapped_tensors():
    model = _reduced("0_rw")
    sd = {**_state_dict("0_rw"), "stages.2.blocks.0.attn.extra.weight": np.zeros(1)}
    with pytest.raises(ValueError, match=r"no place in CoAtNet \(1\):\s+stages\.2\.blocks\.0"
                                         r"\.attn\.extra\.weight"):
        timm_coatnet.convert(sd, model, image_shape=(1, 64, 96, 3))


def test_from_timm_imports_through_the_name_table():
    """``from_timm`` with timm's name and tag (reduced sizes as overrides) gives the golden's
    logits; the weight tag picks timm's preprocessing for those weights."""
    s = CONFIG["sizes"]
    sizes = dict(depths=tuple(s["depths"]), widths=tuple(s["embed_dim"]),
                 stem_widths=tuple(s["stem_width"]), head_dim=s["dim_head"],
                 rel_pos_dim=s["rel_pos_dim"])
    model, variables = from_timm("coatnet_rmlp_1_rw_224.sw_in1k", _state_dict("rmlp_1_rw"),
                                 **sizes)
    x = GOLDEN["input"].astype(np.float32)
    np.testing.assert_allclose(_logits(model, variables, x), GOLDEN["rmlp_1_rw/logits"],
                               rtol=1e-4, atol=1e-4)
    meta = import_timm("coatnet_rmlp_2_rw_384", _state_dict("rmlp_2_rw"), **sizes).meta
    assert meta["model_name"] == "coatnet_rmlp_2_rw_384"
    assert meta["preprocessing"]["input_size"] == [3, 384, 384]
    assert meta["preprocessing"]["crop_mode"] == "squash"
    assert meta["num_classes"] == s["num_classes"]
