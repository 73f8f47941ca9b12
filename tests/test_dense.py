"""Dense on flattened leading axes: nn.Dense's variables and outputs, a weight gradient
that XLA:CPU computes without transposing 4-D copies, and matmul's CPU weight gradient
(narrower operand on the left) against XLA's own."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.layers.dense import Dense, matmul


@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7), (2, 3, 4, 7)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_same_variables_and_outputs_as_nn_dense(shape, use_bias):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref, ours = nn.Dense(6, use_bias=use_bias), Dense(6, use_bias=use_bias)
    variables = ref.init(jax.random.PRNGKey(1), x)
    # Same names, shapes and (same key) initial values: checkpoints and converters hold.
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.PRNGKey(1), x), variables)
    y = ours.apply(variables, x)
    assert y.shape == (*shape[:-1], 6)
    np.testing.assert_allclose(y, ref.apply(variables, x), rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda v, m=m: jnp.sum(jnp.sin(m.apply(v, x))))(variables)
             for m in (ref, ours)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


def test_bfloat16_compute_keeps_float32_parameters():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 3, 8))
    variables = Dense(4).init(jax.random.PRNGKey(3), x)
    y = Dense(4, dtype=jnp.bfloat16).apply(variables, x)
    assert y.dtype == jnp.bfloat16 and variables["params"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(y.astype(jnp.float32), nn.Dense(4).apply(variables, x),
                               rtol=0.02, atol=0.02)


def test_weight_gradient_of_a_map_has_no_4d_transpose():
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 16))

    def transposes_4d(module):
        variables = module.init(jax.random.PRNGKey(5), x)
        grad = jax.grad(lambda v, x: jnp.sum(jax.nn.gelu(module.apply(v, x)) ** 2),
                        argnums=(0, 1))
        hlo = jax.jit(grad).lower(variables, x).compile().as_text()
        return len(re.findall(r"= f32\[\d+,\d+,\d+,\d+\]\S* transpose\(", hlo))

    assert transposes_4d(nn.Dense(32)) > 0  # the check below can fail
    assert transposes_4d(Dense(32)) == 0


def test_bias_gradient_sums_the_2d_output_gradient():
    """The bias joins the 2-D product, so its gradient reduces the same 2-D array that the
    products' gradients read (a transposed incoming gradient is then transposed once)."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 16))

    def bias_sum_ranks(module):
        variables = module.init(jax.random.PRNGKey(5), x)
        jaxpr = jax.make_jaxpr(jax.grad(
            lambda v: jnp.sum(jnp.transpose(module.apply(v, x), (0, 2, 1, 3)) ** 2)))(variables)
        return {e.invars[0].aval.ndim for e in jaxpr.jaxpr.eqns
                if e.primitive.name == "reduce_sum" and e.outvars[0].aval.shape == (32,)}

    assert bias_sum_ranks(nn.Dense(32)) == {4}  # the check below can fail
    assert bias_sum_ranks(Dense(32)) == {2}


# Narrows (40 rows: the transposed form), narrows with fewer rows than columns (the direct
# one), widens, square.
@pytest.mark.parametrize("k, n", [(24, 6), (48, 6), (6, 24), (8, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_equal_xla_gradients(k, n, dtype):
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    x = jax.random.normal(keys[0], (40, k), dtype)
    w = jax.random.normal(keys[1], (k, n), dtype)
    dy = jax.random.normal(keys[2], (40, n), dtype)
    outs = {}
    for impl in ("narrow_left", "native", "auto"):
        y, vjp = jax.vjp(lambda x, w, impl=impl: matmul(x, w, impl=impl), x, w)
        outs[impl] = (y, *vjp(dy))
    # float64 numpy: the products themselves, not another run of the code under test.
    x64, w64, dy64 = (np.asarray(t, np.float64) for t in (x, w, dy))
    expected = (x64 @ w64, dy64 @ w64.T, x64.T @ dy64)
    tol = 1e-5 if dtype == jnp.float32 else 0.1
    for impl, got in outs.items():
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == dtype, impl
            np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol * k)


def test_matmul_transposes_the_weight_gradient_only_where_a_tall_layer_narrows():
    def barriers(rows, k, n):
        x, w = jnp.ones((rows, k)), jnp.ones((k, n))
        jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(matmul(x, w, impl="narrow_left"))))(w)
        return str(jaxpr).count("optimization_barrier")

    assert barriers(64, 32, 8) == 1  # in > out: (dy^T x)^T, held apart from XLA's simplifier
    assert barriers(16, 32, 8) == 0  # fewer rows than columns: the direct product
    assert barriers(64, 8, 32) == 0


def test_matmul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
        matmul(jnp.ones((4, 3)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="impl must be"):
        matmul(jnp.ones((4, 3)), jnp.ones((3, 2)), impl="fast")
