"""The speed switches (layers/scan.py) against the plain unrolled path on a tiny CoAtNet:
``remat="block"`` and ``scan_blocks=True`` give the same logits, BatchNorm updates and
gradients once the unrolled variables are moved to the stacked layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.coatnet import CoAtNet
from hybrid_attn.models.layers.scan import stack_blocks, unstack_blocks

KW = dict(depths=(1, 2, 3, 2), widths=(8, 16, 16, 16), stem_width=8, head_dim=8,
          num_classes=5)


def to_layout(variables, fn):
    """Apply ``fn(stage_tree, depth)`` to every stage of every collection."""
    return {c: {k: fn(t, KW["depths"][int(k[-1]) - 1]) if k.startswith("stage") else t
                for k, t in tree.items()} for c, tree in variables.items()}


def init(model, x):
    return jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)


def logits(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def loss_and_stats(model, variables, x):
    """Training-mode logits, BatchNorm updates and parameter gradients (jitted: with
    conftest's fast-compile flags one compile beats running the ops one by one)."""
    def loss(params):
        y, upd = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(y * jnp.arange(5.0)), (y, upd["batch_stats"])
    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    return y, stats, grads


@pytest.fixture(scope="module")
def plain():
    """The unrolled model, its variables, an input, and its training-mode results."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    model = CoAtNet(**KW)
    variables = init(model, x)
    return model, variables, x, loss_and_stats(model, variables, x)


def close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-5)
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.slow
# remat alone: each stage's unrolled block0 in (True, "block") goes through remat_block
# (and ResNet's remat is compared below).
@pytest.mark.parametrize("scan, remat", [(True, "none"), (True, "block")])
def test_switches_equal_plain_path(plain, scan, remat):
    model, variables, x, (y, stats, grads) = plain
    fast = CoAtNet(**KW, scan_blocks=scan, remat=remat)
    moved = to_layout(variables, stack_blocks) if scan else variables
    shapes = jax.eval_shape(lambda x: fast.init(jax.random.PRNGKey(0), x, train=False), x)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, moved)
    close(logits(fast, moved, x), logits(model, variables, x))
    fy, fstats, fgrads = loss_and_stats(fast, moved, x)
    back = (lambda t: to_layout({"v": t}, lambda s, d: unstack_blocks(s) if d > 1 else s)["v"]
            ) if scan else (lambda t: t)
    close(fy, y)
    close(back(fstats), stats)
    close(back(fgrads), grads)


def test_stack_unstack_round_trip(plain):
    _, variables, _, _ = plain
    stage = variables["params"]["stage3"]
    stacked = stack_blocks(stage, 3)
    assert sorted(stacked) == ["block0", "blocks"]
    k1 = jax.tree.leaves(stage["block1"])[0]
    assert jax.tree.leaves(stacked["blocks"]["block"])[0].shape == (2, *k1.shape)
    close(unstack_blocks(stacked), stage)


def test_bad_switches_fail_clearly(plain):
    _, _, x, _ = plain
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
    plain_model = ResNet(stage_sizes=(1, 2, 1, 1), width=4, num_classes=5)
    variables = init(plain_model, x)
    fast = ResNet(stage_sizes=(1, 2, 1, 1), width=4, num_classes=5, remat="block")
    y, stats, grads = loss_and_stats(plain_model, variables, x)
    fy, fstats, fgrads = loss_and_stats(fast, variables, x)
    close(fy, y)
    close(fstats, stats)
    close(fgrads, grads)
