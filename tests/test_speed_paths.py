"""The speed switches (layers/scan.py) against the plain unrolled path on a tiny CoAtNet:
``remat="block"`` and ``scan_blocks=True`` give the same logits, BatchNorm updates and
gradients once the unrolled variables are moved to the stacked layout."""

import jax
import pytest
from scan_equivalence import check_equal, close

from hybrid_attn.models.coatnet import CoAtNet
from hybrid_attn.models.layers.scan import stack_blocks, unstack_blocks

KW = dict(depths=(1, 2, 3, 2), widths=(8, 16, 16, 16), stem_width=8, head_dim=8,
          num_classes=5)


@pytest.fixture(scope="module")
def plain():
    """The unrolled model, its variables and an input."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    model = CoAtNet(**KW)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    return model, variables, x


@pytest.mark.slow
def test_switches_equal_plain_path():
    # remat alone: each stage's unrolled block0 in (True, "block") goes through remat_block
    # (and ResNet's remat is compared below).
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    check_equal(CoAtNet, KW, x, [(True, "none"), (True, "block")])


def test_stack_unstack_round_trip(plain):
    _, variables, _ = plain
    stage = variables["params"]["stage3"]
    stacked = stack_blocks(stage, 3)
    assert sorted(stacked) == ["block0", "blocks"]
    k1 = jax.tree.leaves(stage["block1"])[0]
    assert jax.tree.leaves(stacked["blocks"]["block"])[0].shape == (2, *k1.shape)
    close(unstack_blocks(stacked), stage)


def test_bad_switches_fail_clearly(plain):
    _, _, x = plain
    with pytest.raises(ValueError, match="remat must be one of"):
        jax.eval_shape(lambda x: CoAtNet(**KW, remat="full").init(  # raised while tracing
            jax.random.PRNGKey(0), x, train=False), x)
    with pytest.raises(ValueError, match="one drop-path rate"):
        jax.eval_shape(lambda x: CoAtNet(**KW, scan_blocks=True, drop_path_rate=0.1).init(
            jax.random.PRNGKey(0), x, train=False), x)
    with pytest.raises(ValueError, match="has no"):
        stack_blocks({"block0": {}}, 3)


@pytest.mark.slow
def test_resnet_remat_equals_plain():
    from hybrid_attn.models.resnet import ResNet
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    check_equal(ResNet, dict(stage_sizes=(1, 2, 1, 1), width=4, num_classes=5), x,
                [(False, "block")])
