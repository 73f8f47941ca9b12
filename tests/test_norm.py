"""layers/norm.py's LayerNorm and BatchNorm against flax.linen's and float64 loops: the same
variables, the same forward pass (and running statistics), and on CPU a written-out backward
pass whose gradients equal autodiff of flax's and finite differences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.layers import norm


def _reference(x, scale, bias, eps):
    """Float64 LayerNorm over the last axis, row by row (two-pass variance)."""
    x = np.asarray(x, np.float64)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        mean = row.sum() / row.size
        var = ((row - mean) ** 2).sum() / row.size
        out[i] = (row - mean) / np.sqrt(var + eps) * scale + bias
    return out.reshape(x.shape)


def _numeric_vjp(reference, x, d_y, h=1e-6):
    """``d_y``'s vector-Jacobian product with ``reference`` (a float64 function of ``x``) by
    central differences, element by element."""
    x64, d_y64 = np.asarray(x, np.float64), np.asarray(d_y, np.float64)
    numeric = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        plus, minus = x64.copy(), x64.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = ((reference(plus) - reference(minus)) * d_y64).sum() / (2 * h)
    return numeric


def _inputs(shape, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    # An offset mean, so that the fast (one-pass) variance is exercised away from zero.
    x = (3.0 + 2.0 * jax.random.normal(k[0], shape)).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k[1], shape[-1:])
    bias = 0.1 * jax.random.normal(k[2], shape[-1:])
    d_y = jax.random.normal(k[3], shape).astype(dtype)
    return x, {"params": {"scale": scale, "bias": bias}}, d_y


def test_parameters_equal_flax():
    x = jnp.ones((2, 5, 7))
    ours = norm.LayerNorm(epsilon=1e-5).init(jax.random.PRNGKey(0), x)
    theirs = nn.LayerNorm(epsilon=1e-5).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 6, 32), (50, 256)])
def test_forward_and_gradients_equal_flax_and_a_float64_loop(shape, fast):
    eps = 1e-6
    x, variables, d_y = _inputs(shape)
    ours = norm.LayerNorm(epsilon=eps, use_fast_variance=fast)
    flax_ln = nn.LayerNorm(epsilon=eps, use_fast_variance=fast)
    expected = _reference(x, *(np.asarray(variables["params"][k], np.float64)
                               for k in ("scale", "bias")), eps)

    def grads(module):
        y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, x)
        return y, vjp(d_y)

    (y, (d_vars, d_x)), (y_flax, (d_vars_flax, d_x_flax)) = (
        jax.jit(lambda m=m: grads(m))() for m in (ours, flax_ln))
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(y, y_flax, rtol=0, atol=2e-5)
    # The CPU form's gradients are the written-out ones: the same as autodiff of flax's.
    np.testing.assert_allclose(d_x, d_x_flax, rtol=0, atol=1e-4 * float(jnp.abs(d_x_flax).max()))
    for k in ("scale", "bias"):
        ref = d_vars_flax["params"][k]
        np.testing.assert_allclose(d_vars["params"][k], ref, rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(ref).max()))
    # ... and the analytic gradient of the float64 reference, sum over rows of d_y * x_hat
    # and of d_y, checked independently of either autodiff.
    x64 = np.asarray(x, np.float64)
    x_hat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(d_vars["params"]["bias"], np.asarray(d_y, np.float64).sum(axes),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d_vars["params"]["scale"], (np.asarray(d_y) * x_hat).sum(axes),
                               rtol=1e-4, atol=1e-3)


def test_input_gradient_equals_finite_differences_in_float64():
    """The written-out ``dx`` against central differences of the float64 loop."""
    eps = 1e-6
    x, variables, d_y = _inputs((3, 8))
    scale, bias = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
    _, vjp = jax.vjp(lambda x: norm.LayerNorm(epsilon=eps).apply(variables, x), x)
    (d_x,) = vjp(d_y)
    numeric = _numeric_vjp(lambda x: _reference(x, scale, bias, eps), x, d_y)
    np.testing.assert_allclose(d_x, numeric, rtol=1e-3, atol=1e-4)


def test_bfloat16_follows_flax_dtypes():
    x, variables, d_y = _inputs((2, 4, 4, 16), jnp.bfloat16)
    for dtype in (None, jnp.bfloat16):
        ours = norm.LayerNorm(dtype=dtype)
        y, vjp = jax.vjp(ours.apply, variables, x)
        y_flax = nn.LayerNorm(dtype=dtype).apply(variables, x)
        assert y.dtype == y_flax.dtype  # float32 (promoted) without a dtype, else bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_flax, np.float32),
                                   atol=3e-2)
        d_vars, d_x = vjp(d_y.astype(y.dtype))
        assert d_x.dtype == jnp.bfloat16
        assert d_vars["params"]["scale"].dtype == jnp.float32


def test_cpu_form_is_the_custom_gradient_and_other_backends_get_flax_math():
    x, variables, _ = _inputs((2, 3, 8))
    module = norm.LayerNorm(epsilon=1e-5)
    jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, x)
    assert "custom_vjp_call" in {e.primitive.name for e in jaxpr.jaxpr.eqns}
    # The non-CPU form, run here: flax's computation, to rounding.
    p = variables["params"]
    plain = norm._layer_norm(x, p["scale"], p["bias"], 1e-5, True, jnp.float32)
    np.testing.assert_allclose(plain, nn.LayerNorm(epsilon=1e-5).apply(variables, x),
                               rtol=0, atol=1e-6)


def _flax_batch_norm(train):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        force_float32_reductions=True)


def _batch_reference(x, scale, bias, eps):
    """Float64 BatchNorm with batch statistics, channel by channel (two-pass variance)."""
    rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    for c in range(rows.shape[1]):
        col = rows[:, c]
        mean = col.sum() / col.size
        var = ((col - mean) ** 2).sum() / col.size
        out[:, c] = (col - mean) / np.sqrt(var + eps) * scale[c] + bias[c]
    return out.reshape(x.shape)


@pytest.mark.parametrize("written", [True, False])
def test_batch_norm_equals_flax_in_training_and_inference(written):
    x, variables, d_y = _inputs((4, 5, 5, 16))
    ours = norm.BatchNorm(use_running_average=False, written_backward=written)
    init = ours.init(jax.random.PRNGKey(0), x)
    jax.tree.map(np.testing.assert_array_equal, init,
                 _flax_batch_norm(True).init(jax.random.PRNGKey(0), x))
    variables = {**variables, "batch_stats": {"mean": jnp.full((16,), 0.5),
                                              "var": jnp.full((16,), 2.0)}}

    def grads(module):
        def f(params, x):
            y, updates = module.apply({**variables, "params": params}, x,
                                      mutable=["batch_stats"])
            return y, updates
        (y, updates), vjp = jax.vjp(f, variables["params"], x)
        zero_stats = jax.tree.map(jnp.zeros_like, updates)
        return y, updates, vjp((d_y, zero_stats))

    (y, stats, (d_p, d_x)), (y_f, stats_f, (d_p_f, d_x_f)) = (
        jax.jit(lambda m=m: grads(m))() for m in (ours, _flax_batch_norm(True)))
    p = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
    np.testing.assert_allclose(y, _batch_reference(x, p["scale"], p["bias"], 1e-5), atol=2e-5)
    np.testing.assert_allclose(y, y_f, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 stats, stats_f)  # running averages, momentum 0.9
    np.testing.assert_allclose(d_x, d_x_f, atol=1e-4 * float(jnp.abs(d_x_f).max()))
    for k in ("scale", "bias"):
        np.testing.assert_allclose(d_p[k], d_p_f[k], rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(d_p_f[k]).max()))
    # Inference: running statistics, as flax's.
    ours_eval = norm.BatchNorm(use_running_average=True, written_backward=written)
    np.testing.assert_allclose(ours_eval.apply(variables, x),
                               _flax_batch_norm(False).apply(variables, x), atol=1e-6)
    names = {e.primitive.name for e in jax.make_jaxpr(
        lambda v, x: ours.apply(v, x, mutable=["batch_stats"]))(variables, x).jaxpr.eqns}
    assert ("custom_vjp_call" in names) == written


def test_batch_norm_input_gradient_equals_finite_differences_in_float64():
    x, variables, d_y = _inputs((3, 2, 2, 4))
    variables = {**variables, "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
    scale, bias = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
    module = norm.BatchNorm(use_running_average=False)
    _, vjp = jax.vjp(lambda x: module.apply(variables, x, mutable=["batch_stats"])[0], x)
    (d_x,) = vjp(d_y)
    numeric = _numeric_vjp(lambda x: _batch_reference(x, scale, bias, 1e-5), x, d_y)
    np.testing.assert_allclose(d_x, numeric, rtol=1e-3, atol=1e-4)


def test_batch_norm_cpu_statistics_outputs_carry_their_gradients():
    """batch_norm_cpu also returns the batch mean and variance (for the running averages);
    a function of them gets autodiff's gradient of the plain form."""
    x, variables, d_y = _inputs((3, 4, 4, 8))
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    a, b = jnp.linspace(-1.0, 1.0, 8), jnp.linspace(2.0, -0.5, 8)

    def loss(fn, x, scale, bias):
        y, mean, var = fn(x, scale, bias)
        return jnp.sum(y * d_y) + jnp.sum(mean * a) + jnp.sum(var * b)

    def plain(x, scale, bias):
        mean, var = norm._batch_statistics(x)
        return norm._batch_normalize(x, mean, var, scale, bias, 1e-5, jnp.float32), mean, var

    ours = jax.grad(lambda *t: loss(
        lambda x, s, b_: norm.batch_norm_cpu(x, s, b_, 1e-5, jnp.float32), *t),
        argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(lambda *t: loss(plain, *t), argnums=(0, 1, 2))(x, scale, bias)
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))
