"""``scan_blocks`` (and ``remat``) on Twins and the ResNet family against the plain
unrolled path: the same logits, BatchNorm updates and gradients once the unrolled
variables are moved to the stacked layout with ``stack_blocks`` (layers/scan.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scan_equivalence import check_equal, close

from hybrid_attn.models.botnet import BoTNet
from hybrid_attn.models.layers.scan import same_factory, stack_blocks, unstack_blocks
from hybrid_attn.models.resnet import ResNet
from hybrid_attn.models.twins import PAIR_MEMBERS, Twins

RESNET = dict(stage_sizes=(1, 3, 1, 2), width=4, num_classes=5)
BOTNET = dict(stage_sizes=(1, 2, 1, 3), width=4, num_classes=5, last_stride=1, num_heads=2)


def _trace(model, x):
    """``model.init`` traced only (the errors are raised while tracing)."""
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


@pytest.mark.slow
def test_resnet_family_scan_equals_plain():
    """BoTNet covers both kinds of ResNet stage: c3 scans two bottlenecks with 3x3 convs,
    c5 two with global attention (scan + remat: CoAtNet, test_speed_paths; Twins below)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    check_equal(BoTNet, BOTNET, x, [(True, "none")])


def test_one_repeated_block_is_not_a_loop():
    """RESNET scans stage 2's two repeated blocks with nn.scan; stage 4 has one, which keeps
    the stacked layout (leading axis 1) but runs without a loop (layers/scan.py)."""
    x = jnp.zeros((1, 32, 32, 3))
    model = ResNet(**RESNET, scan_blocks=True)
    variables = _trace(model, x)
    assert variables["params"]["stage4"]["blocks"]["block"]["conv1"]["kernel"].shape[0] == 1
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
    assert jaxpr.count("scan[") == 1


def test_resnet_scan_errors_and_default_tree():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="stage2: scan_blocks cannot scan"):
        _trace(ResNet(**RESNET, non_local_stages=(1,), scan_blocks=True), x)
    with pytest.raises(ValueError, match="stage2: scan_blocks needs one drop-path rate"):
        _trace(ResNet(**RESNET, drop_path_rate=0.1, scan_blocks=True), x)
    shapes = jax.eval_shape(lambda: ResNet(**RESNET, scan_blocks=True).init(
        jax.random.PRNGKey(0), x, train=False))["params"]["stage2"]
    assert sorted(shapes) == ["block0", "blocks"]
    assert shapes["blocks"]["block"]["conv1"]["kernel"].shape[0] == 2
    bot = BoTNet(**BOTNET)
    assert same_factory(bot.block_spatial(3, 1), bot.block_spatial(3, 2))
    assert not same_factory(bot.block_spatial(3, 1), None)


TINY = dict(embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2),
            num_classes=5)
SVT = dict(TINY, depths=(1, 2, 5, 1), window_sizes=(2, 2, 2, 2))
# Stage 2 scans one LSA/GSA pair (a single group: no loop, layers/scan.py), stage 3 two.
SVT_SCAN = dict(SVT, depths=(1, 4, 6, 1))
PCPVT = dict(TINY, depths=(1, 3, 1, 1))


def _svt_stack(stage, depth):
    return stack_blocks(stage, depth, start=2, period=2, members=PAIR_MEMBERS)


def _svt_unstack(stage, depth):
    return unstack_blocks(stage, start=2, members=PAIR_MEMBERS) if depth > 3 else stage


def _pcpvt_unstack(stage, depth):
    return unstack_blocks(stage)


@pytest.mark.slow
@pytest.mark.parametrize("kw, switches, stack, unstack", [
    (SVT_SCAN, [(True, "block")], _svt_stack, _svt_unstack),  # remat alone: CoAtNet, ResNet
    (PCPVT, [(True, "none")], stack_blocks, _pcpvt_unstack),
], ids=["svt", "pcpvt"])
def test_twins_scan_equals_plain(kw, switches, stack, unstack):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    check_equal(Twins, kw, x, switches, stack, unstack)


def test_twins_layout_round_trip_and_errors():
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: Twins(**SVT).init(jax.random.PRNGKey(0), x,
                                                         train=False))["params"]["stage3"]
    variables = jax.tree.map(lambda s: jnp.arange(np.prod(s.shape), dtype=jnp.float32).reshape(
        s.shape), variables)
    stacked = _svt_stack(variables, 5)
    assert sorted(stacked) == ["block0", "block1", "block4", "blocks", "patch_embed", "peg"]
    assert sorted(stacked["blocks"]["block"]) == ["global", "local"]
    assert "qkv" in stacked["blocks"]["block"]["local"]["attn"]
    assert "kv" in stacked["blocks"]["block"]["global"]["attn"]
    assert stacked["blocks"]["block"]["local"]["norm1"]["scale"].shape == (1, 8)
    close(unstack_blocks(stacked, start=2, members=PAIR_MEMBERS), variables)
    with pytest.raises(ValueError, match="remat must be one of"):
        _trace(Twins(**SVT, remat="full"), x)
    with pytest.raises(ValueError, match="stage3: scan_blocks needs one drop-path rate"):
        _trace(Twins(**SVT, scan_blocks=True, drop_path_rate=0.1), x)
    with pytest.raises(ValueError, match="member names"):
        stack_blocks(variables, 5, start=2, period=2)
