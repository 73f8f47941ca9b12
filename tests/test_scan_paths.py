"""``scan_blocks`` (and ``remat``) on Twins and the ResNet family against the plain
unrolled path: the same logits, BatchNorm updates and gradients once the unrolled
variables are moved to the stacked layout with ``stack_blocks`` (layers/scan.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.botnet import BoTNet
from hybrid_attn.models.layers.scan import same_factory, stack_blocks, unstack_blocks
from hybrid_attn.models.resnet import ResNet

RESNET = dict(stage_sizes=(1, 3, 1, 2), width=4, num_classes=5)
BOTNET = dict(stage_sizes=(1, 1, 1, 3), width=4, num_classes=5, last_stride=1, num_heads=2)


def to_layout(variables, depths, fn):
    """Apply ``fn(stage_tree, depth)`` to every stage with more than one block."""
    return {c: {k: fn(t, depths[int(k[5:]) - 1])
                if k.startswith("stage") and depths[int(k[5:]) - 1] > 1 else t
                for k, t in tree.items()} for c, tree in variables.items()}


def run(model, variables, x):
    """Eval logits, training logits, BatchNorm updates and gradients (jitted: with
    conftest's fast-compile flags one compile beats running the ops one by one)."""
    def loss(params):
        y, upd = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(y * jnp.arange(5.0)), (y, upd["batch_stats"])
    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    return jax.jit(lambda v: model.apply(v, x, train=False))(variables), y, stats, grads


def close(a, b, tol=2e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


def _unstack(stage, depth):
    return unstack_blocks(stage)


def check_equal(cls, kw, x, switches):
    plain = cls(**kw)
    variables = plain.init(jax.random.PRNGKey(0), x, train=False)
    ref = run(plain, variables, x)
    depths = kw.get("stage_sizes") or kw["depths"]
    for scan, remat in switches:
        fast = cls(**kw, scan_blocks=scan, remat=remat)
        moved = to_layout(variables, depths, stack_blocks) if scan else variables
        shapes = jax.eval_shape(lambda x, m=fast: m.init(jax.random.PRNGKey(0), x, train=False), x)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, moved)
        ev, y, stats, grads = run(fast, moved, x)
        back = (lambda t: to_layout({"v": t}, depths, _unstack)["v"]) if scan else (lambda t: t)
        close(ev, ref[0])
        close(y, ref[1])
        close(back(stats), ref[2])
        close(back(grads), ref[3])


@pytest.mark.parametrize("cls, kw", [(ResNet, RESNET), (BoTNet, BOTNET)], ids=["resnet", "botnet"])
def test_resnet_family_scan_equals_plain(cls, kw):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    switches = [(True, "none"), (True, "block")] if cls is ResNet else [(True, "none")]
    check_equal(cls, kw, x, switches)


def test_resnet_scan_errors_and_default_tree():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="stage2: scan_blocks cannot scan"):
        ResNet(**RESNET, non_local_stages=(1,), scan_blocks=True).init(
            jax.random.PRNGKey(0), x, train=False)
    with pytest.raises(ValueError, match="stage2: scan_blocks needs one drop-path rate"):
        ResNet(**RESNET, drop_path_rate=0.1, scan_blocks=True).init(
            jax.random.PRNGKey(0), x, train=False)
    shapes = jax.eval_shape(lambda: ResNet(**RESNET, scan_blocks=True).init(
        jax.random.PRNGKey(0), x, train=False))["params"]["stage2"]
    assert sorted(shapes) == ["block0", "blocks"]
    assert shapes["blocks"]["block"]["conv1"]["kernel"].shape[0] == 2
    bot = BoTNet(**BOTNET)
    assert same_factory(bot.block_spatial(3, 1), bot.block_spatial(3, 2))
    assert not same_factory(bot.block_spatial(3, 1), None)
