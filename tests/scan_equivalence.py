"""The scan/remat equivalence check shared by tests/test_speed_paths.py (CoAtNet, ResNet
remat) and tests/test_scan_paths.py (Twins, the ResNet family): a model with the switches
gives the plain unrolled model's eval logits, training logits, BatchNorm updates and
gradients once the unrolled variables are moved to the stacked layout (layers/scan.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_attn.models.layers.scan import stack_blocks, unstack_blocks


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
        return jnp.sum(y * jnp.arange(5.0)), (y, upd.get("batch_stats", {}))
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


def check_equal(cls, kw, x, switches, stack=stack_blocks, unstack=_unstack):
    """``cls(**kw)`` against ``cls(**kw, scan_blocks=scan, remat=remat)`` for each
    ``(scan, remat)`` of ``switches`` (the model needs ``num_classes=5``); ``stack`` /
    ``unstack`` move one stage's tree, called as ``fn(stage_tree, depth)``."""
    plain = cls(**kw)
    variables = jax.jit(lambda x: plain.init(jax.random.PRNGKey(0), x, train=False))(x)
    ref = run(plain, variables, x)
    depths = kw.get("stage_sizes") or kw["depths"]
    for scan, remat in switches:
        fast = cls(**kw, scan_blocks=scan, remat=remat)
        moved = to_layout(variables, depths, stack) if scan else variables
        shapes = jax.eval_shape(lambda x, m=fast: m.init(jax.random.PRNGKey(0), x, train=False), x)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, moved)
        ev, y, stats, grads = run(fast, moved, x)
        back = (lambda t: to_layout({"v": t}, depths, unstack)["v"]) if scan else (lambda t: t)
        close(ev, ref[0])
        close(y, ref[1])
        close(back(stats), ref[2])
        close(back(grads), ref[3])
