"""Dense on flattened leading axes: nn.Dense's variables and outputs, and a weight gradient
that XLA:CPU computes without transposing 4-D copies."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.layers.dense import Dense


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
