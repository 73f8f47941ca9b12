"""The optimiser's weight-decay rule on real models' parameter trees, and that decay
reaches exactly the leaves the rule names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hybrid_attn import optim, sharding
from hybrid_attn.models import get_model

# Small variants of each family with a position term, and the input they take.
MODELS = {
    "coatnet": (dict(name="coatnet_0", depths=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                     stem_width=8, head_dim=8), 32),
    "botnet": (dict(name="botnet50", width=8), 64),
    "sasa": (dict(name="sasa_resnet26", width=16), 32),
    "twins": (dict(name="twins_svt_s"), 32),
}


def _params(kwargs, res):
    kwargs = dict(kwargs)
    model = get_model(kwargs.pop("name"), num_classes=5, **kwargs)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)),
                                             train=False))["params"]


def _expected(path: str) -> bool:
    """The rule written out by kind of parameter, independently of ndim."""
    parts = path.split("/")
    if "position" in parts:  # relative bias tables, relative / absolute embeddings
        return False
    if parts[-1] in ("bias", "scale"):  # biases, norm scales
        return False
    if parts[-1] in ("kernel", "value"):  # conv / dense kernels, the SASA stem's values
        return True
    raise AssertionError(f"{path}: a parameter kind the rule does not declare")


@pytest.mark.parametrize("family", sorted(MODELS))
def test_decay_mask_follows_the_declared_rule(family):
    params = _params(*MODELS[family])
    mask = optim.decay_mask(params)
    leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
    got = {sharding.path_string(p): bool(m) for p, m in leaves}
    assert got == {path: _expected(path) for path in got}
    assert any(got.values()) and not all(got.values())
    if family != "twins":  # every position term sits under .../position/... and never decays
        assert any("/position/" in p or p.startswith("position/") for p in got)
    if family == "sasa":
        assert got["stem/value"]


def test_only_the_masked_leaves_decay():
    """One AdamW step with zero gradients moves a leaf by -lr * wd * leaf where it decays,
    and not at all elsewhere."""
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
              "norm": {"scale": jnp.ones((4,))},
              "attn": {"position": {"relative_bias_table": jnp.ones((3, 3, 2))}}}
    cfg = optim.OptimConfig(learning_rate=0.1, weight_decay=0.5, grad_clip_norm=0.0)
    tx = optim.make_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5)
    for leaf in (new["dense"]["bias"], new["norm"]["scale"],
                 new["attn"]["position"]["relative_bias_table"]):
        np.testing.assert_array_equal(leaf, 1.0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_invalid_learning_rate_is_a_one_line_error(name):
    """Before: learning_rate=0 reached make_schedule's end/peak ratio (ZeroDivisionError)."""
    for lr in (0.0, -1.0):
        with pytest.raises(ValueError, match="need learning_rate > 0") as e:
            optim.OptimConfig.from_config({"name": name, "learning_rate": lr}, 10)
        assert "\n" not in str(e.value)


def _numpy_adamw(params, grads_per_step, lrs, mask, *, b1, b2, eps, wd, clip):
    """AdamW written out in numpy, leaf by leaf: global-norm clip, bias-corrected moments,
    decoupled decay on the masked leaves (Loshchilov & Hutter), as the reference."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        norm = np.sqrt(sum((v ** 2).sum() for v in g.values()))
        if norm > clip:
            g = {k: v * clip / norm for k, v in g.items()}
        for k in p:
            mu[k] = b1 * mu[k] + (1 - b1) * g[k]
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
            step = (mu[k] / (1 - b1 ** t)) / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
            p[k] = p[k] - lr * (step + (wd * p[k] if mask[k] else 0.0))
    return p


def _nested(flat: dict) -> dict:
    """``{"conv/kernel": x}`` -> ``{"conv": {"kernel": x}}`` as jax arrays."""
    tree = {}
    for key, value in flat.items():
        scope, name = key.split("/")
        tree.setdefault(scope, {})[name] = jnp.asarray(value)
    return tree


@pytest.mark.parametrize("flat_state", [False, True])
def test_adamw_matches_a_numpy_reference_in_both_layouts(flat_state):
    """Four steps of warmup + cosine with clipping active: the per-leaf optimizer and the
    flat-state one (``optax.flatten``) both equal AdamW written out in numpy."""
    rng = np.random.default_rng(0)
    shapes = {"conv/kernel": (3, 3, 2, 4), "conv/bias": (4,), "norm/scale": (4,),
              "position/table": (5, 2), "dense/kernel": (4, 3)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (3 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
             for _ in range(4)]
    cfg = optim.OptimConfig(learning_rate=0.05, end_learning_rate=0.001, warmup_steps=2,
                            weight_decay=0.3, b1=0.8, b2=0.95, eps=1e-6, grad_clip_norm=2.0,
                            flat_state=flat_state)
    schedule = optim.make_schedule(cfg, total_steps=6)
    tx = optim.make_optimizer(cfg, schedule)
    p = _nested(params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(_nested(g), state, p)
        p = optax.apply_updates(p, updates)
    mask = {k: k.endswith("kernel") for k in shapes}  # the rule: matrices, not position
    want = _numpy_adamw(params, grads, [float(schedule(i)) for i in range(4)], mask,
                        b1=0.8, b2=0.95, eps=1e-6, wd=0.3, clip=2.0)
    for k, v in want.items():
        scope, name = k.split("/")
        np.testing.assert_allclose(p[scope][name], v, rtol=2e-5, atol=1e-6, err_msg=k)
    moments = [x for x in jax.tree_util.tree_leaves(state) if x.ndim >= 1]
    if flat_state:  # two flat moment vectors, each holding every parameter
        assert [x.shape for x in moments] == [(sum(int(np.prod(s)) for s in shapes.values()),)] * 2
    else:
        assert len(moments) == 2 * len(shapes)


def test_flat_state_is_for_adamw_only():
    with pytest.raises(ValueError, match="flat_state only with name adamw"):
        optim.OptimConfig(name="sgd", flat_state=True)
