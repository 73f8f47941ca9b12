"""timm's trained BoTNets and HaloNets (models/byoanet.py): each variant at reduced size
against timm goldens (goldens/generate_byoanet.py), timm's strided HaloAttn layer, and every
full-size timm tensor through ``from_timm`` (which pins the parameter counts)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_scalars

from hybrid_attn.convert import common, from_timm, names, timm_byoanet
from hybrid_attn.convert.timm_botnet import convert_attention
from hybrid_attn.models import byoanet, get_model
from hybrid_attn.models.layers.eca import eca_kernel_size
from hybrid_attn.models.layers.halo_attention import HaloBottleneckAttention

GOLDENS = pathlib.Path(__file__).parent / "goldens"
GOLDEN = np.load(GOLDENS / "byoanet.npz")
CONFIG = json.loads(str(GOLDEN["config"]))
TIMM = json.loads((GOLDENS / "byoanet_timm.json").read_text())
OURS = {"botnet26t_256": "botnet26t", "sebotnet33ts_256": "sebotnet33ts",
        "eca_botnext26ts_256": "eca_botnext26ts", "halonet26t": "halonet26t",
        "sehalonet33ts": "sehalonet33ts", "halonet50ts": "halonet50ts",
        "eca_halonext26ts": "eca_halonext26ts", "halo2botnet50ts_256": "halo2botnet50ts"}


def _small(stage: byoanet.Stage) -> byoanet.Stage:
    """The generator's reduction of one stage: widths / 16 (/ 32 above 1024), group size 4,
    halo block 4, and the first block plus the first of every other kind after it."""
    kept: list = []
    for attn in stage.blocks:
        if not kept or attn not in kept:
            kept.append(attn)
    kept = [dataclasses.replace(a, block=4) if a and a.kind == "halo" else a for a in kept]
    width = stage.width // 16 if stage.width <= 1024 else stage.width // 32
    return dataclasses.replace(stage, width=width, blocks=tuple(kept),
                               group_size=4 if stage.group_size else 0)


def _reduced(case: str) -> byoanet.ByoaNet:
    full = get_model(case)
    return get_model(case, stages=tuple(_small(s) for s in full.stages), stem_width=16,
                     num_features=full.num_features // 16, num_classes=5)


def _state_dict(case: str) -> dict[str, np.ndarray]:
    """The case's timm state dict, split back out of its one flat float16 array."""
    flat = GOLDEN[f"{case}/weights"].astype(np.float32)
    sizes = [int(np.prod(shape)) for _, shape in CONFIG["index"][case]]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return {name: p.reshape(shape) for (name, shape), p in zip(CONFIG["index"][case], parts)}


@pytest.mark.slow  # ~10 s each on 2 cores, most of it compiling
@pytest.mark.parametrize("case", sorted(CONFIG["configs"]))
def test_matches_timm_logits(case):
    x = (GOLDEN["input"].astype(np.float32) - 128) / 64
    assert x.shape[1:3] == tuple(CONFIG["hw"]) == (128, 256)
    model = _reduced(case)
    variables = timm_byoanet.convert(_state_dict(case), model)
    common.check_shapes(variables, jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False)))
    f = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    got = f.compile({"xla_backend_optimization_level": 0})(variables, x)
    np.testing.assert_allclose(np.asarray(got), GOLDEN[f"{case}/logits"], rtol=1e-4, atol=1e-4)


def test_strided_halo_layer_matches_timm():
    """timm's HaloAttn at the paper's block 8 with stride 2 (sub-sampled query blocks) and
    query/key heads of 8 against value heads of 4, on a 16 x 24 map."""
    z = np.load(GOLDENS / "byoanet_halo.npz")
    x = z["s2/input"].astype(np.float32)
    sd = {f"self_attn.{k}.weight" if k in ("q", "kv") else f"self_attn.pos_embed.{k}":
          z[f"s2/{k}"].astype(np.float32) for k in ("q", "kv", "height_rel", "width_rel")}
    attn = convert_attention(sd, "self_attn.")
    layer = HaloBottleneckAttention(16, strides=2, num_heads=4, qk_head_dim=8, halo_size=2)
    got = jax.jit(lambda p, x: layer.apply(p, x, train=False))({"params": {"attn": attn}}, x)
    assert got.shape == (2, 8, 12, 16)
    np.testing.assert_allclose(np.asarray(got), z["s2/output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timm_name", sorted(TIMM))
def test_every_full_size_tensor_converts_through_from_timm(timm_name):
    """A full-size state dict of timm's shapes (zeros; the goldens check the values)
    converts with its pretrained tag, every tensor placed and checked against the shapes of
    our model (``jax.eval_shape`` at 256), so our parameter count is timm's."""
    (tag,) = TIMM[timm_name]["pretrained"]
    sd = {k: np.zeros(v, np.float32) for k, v in names.reference()[timm_name]["shapes"].items()}
    model, variables = from_timm(tag, sd)
    assert model == get_model(OURS[timm_name])
    assert count_scalars(variables["params"]) == TIMM[timm_name]["params"]


def test_halo_attention_rejects_maps_off_the_block_grid():
    layer = HaloBottleneckAttention(16, num_heads=4)
    with pytest.raises(ValueError, match=r"multiples of 8, got \(12, 16\)"):
        layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 16, 16)), train=False)


def test_eca_kernel_sizes_follow_the_paper():
    """ECA-Net Eq. 12 with gamma 2, b 1, rounded to odd as timm does: 64 -> 3 ... 2048 -> 7."""
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]


def test_unknown_channel_attention_is_named():
    model = get_model("halonet26t", channel_attention="cbam")
    with pytest.raises(ValueError, match="channel_attention must be None or one of"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)), train=False)
