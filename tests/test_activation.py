"""The erf GELU against a float64 brute force of x * Phi(x) and its derivative."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_attn.models.layers.activation import gelu


def _phi_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_gelu_and_gradient_match_float64_reference():
    xs = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -1e-4, 1e-4, 3.0, -3.0]])
    xs = xs.astype(np.float32)
    ref = np.array([x * _phi_cdf(x) for x in xs.astype(np.float64)])
    dref = np.array([_phi_cdf(x) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
                     for x in xs.astype(np.float64)])
    y = np.asarray(jax.jit(gelu)(xs))
    dy = np.asarray(jax.jit(jax.vmap(jax.grad(gelu)))(xs))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(dy, dref, rtol=1e-6, atol=1e-6)
    # Same function as jax's erfc form (the exact GELU), to float32 rounding.
    np.testing.assert_allclose(y, jax.nn.gelu(xs, approximate=False), atol=2e-6)


def test_gelu_keeps_dtype():
    x = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
    assert gelu(x).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gelu(x), np.float32),
                               np.asarray(gelu(x.astype(jnp.float32))), atol=3e-2)
