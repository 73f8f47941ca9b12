"""Global attention's fused path (``jax.nn.dot_product_attention``; cuDNN on GPU) against a
float64 numpy softmax-attention and against the explicit kernel it replaces when no
weights and no dropout are needed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import softmax

from hybrid_attn.models.layers.attention import Attention
from hybrid_attn.models.layers.attention_kernels import (
    broadcast_batch,
    dot_product_attention,
    fused_dot_product_attention,
    stacked_attention,
)
from hybrid_attn.models.layers.relative_bias import RelativeBias2D
from hybrid_attn.models.layers.relative_logits import RelativeLogits2D


def brute_force(q, k, v, bias, scale):
    """Per batch, head and query, in float64: softmax(q . k * scale + bias) weighted values."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, nq, heads, _ = q.shape
    bias = np.broadcast_to(np.asarray(bias, np.float64), (b, heads, nq, k.shape[1]))
    out = np.zeros((b, nq, heads, v.shape[-1]))
    for i in range(b):
        for h in range(heads):
            for t in range(nq):
                w = softmax(k[i, :, h] @ q[i, t, h] * scale + bias[i, h, t])
                out[i, t, h] = w @ v[i, :, h]
    return out


def qkvb(bias_shape, dtype=jnp.float32, dv=8):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (2, 6, 3, 8), dtype)
    k = jax.random.normal(keys[1], (2, 5, 3, 8), dtype)
    v = jax.random.normal(keys[2], (2, 5, 3, dv), dtype)
    return q, k, v, jax.random.normal(keys[3], bias_shape)


@pytest.mark.parametrize("bias_shape, dv", [((3, 6, 5), 8), ((2, 3, 6, 5), 8),
                                            ((3, 6, 5), 4)])  # dv != d: explicit fallback
def test_fused_output_matches_brute_force(bias_shape, dv):
    q, k, v, bias = qkvb(bias_shape, dv=dv)
    out = fused_dot_product_attention(q, k, v, bias=bias, scale=8**-0.5)
    np.testing.assert_allclose(out, brute_force(q, k, v, bias, 8**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(2, 3, 6, 5), (3, 6, 5)])  # per image / shared
def test_fused_gradients_equal_the_explicit_kernel(bias_shape):
    q, k, v, bias = qkvb(bias_shape)
    scale = 8**-0.5
    loss = lambda f: lambda *a: jnp.sum(f(*a) * jnp.arange(8.0))  # noqa: E731
    fused = jax.grad(loss(lambda q, k, v, b: fused_dot_product_attention(
        q, k, v, bias=b, scale=scale)), argnums=(0, 1, 2, 3))(q, k, v, bias)
    plain = jax.grad(loss(lambda q, k, v, b: dot_product_attention(
        q * scale, k, v, bias=b)[0]), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(2, 3, 6, 5), (3, 6, 5), (1, 1, 6, 5), (2, 1, 1, 5), None])
@pytest.mark.parametrize("impl", ["softmax_attention", "xla"])
def test_cpu_forms_match_brute_force_and_the_explicit_kernels_gradients(bias_shape, impl):
    """Both non-cuDNN forms (the written-out backward pass is the CPU default) against the
    float64 loop and against autodiff of the explicit kernel, bias gradient included for
    every broadcast shape."""
    q, k, v, bias = qkvb(bias_shape or (3, 6, 5))
    bias = None if bias_shape is None else bias
    scale = 8**-0.5
    out = fused_dot_product_attention(q, k, v, bias=bias, scale=scale, impl=impl)
    np.testing.assert_allclose(out, brute_force(q, k, v, 0.0 if bias is None else bias, scale),
                               rtol=1e-5, atol=1e-5)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    loss = lambda f: lambda q, k, v, b=None: jnp.sum(f(q, k, v, b) * jnp.arange(8.0))  # noqa: E731
    fused = jax.grad(loss(lambda q, k, v, b: fused_dot_product_attention(
        q, k, v, bias=b, scale=scale, impl=impl)), argnums=argnums)(q, k, v, bias)
    plain = jax.grad(loss(lambda q, k, v, b: dot_product_attention(
        q * scale, k, v, bias=b)[0]), argnums=argnums)(q, k, v, bias)
    for a, b in zip(fused, plain, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_softmax_attention_in_bfloat16_keeps_float32_logits():
    q, k, v, bias = qkvb((3, 6, 5), jnp.bfloat16)
    out = fused_dot_product_attention(q, k, v, bias=bias, scale=8**-0.5,
                                      impl="softmax_attention")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               brute_force(q, k, v, bias, 8**-0.5), atol=4e-2)
    grads = jax.grad(lambda q, k, v: jnp.sum(fused_dot_product_attention(
        q, k, v, bias=bias, scale=8**-0.5, impl="softmax_attention").astype(jnp.float32)),
        argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())
               for g in grads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_attention_matches_brute_force_and_the_explicit_kernels_gradient(dtype):
    """Head-major ``qkv [3, B, heads, N, d]`` (the tiled-window kernel's form): the output
    against the float64 loop, the stacked gradient against autodiff of the explicit kernel
    on the three planes, and a gradient without the pads that indexing the planes costs."""
    q, k, v, _ = qkvb((3, 6, 5))
    qkv = jnp.stack([q[:, :5], k, v]).swapaxes(2, 3).astype(dtype)  # [3, 2, 3, 5, 8]
    scale = 8**-0.5
    out = stacked_attention(qkv, scale)
    assert out.dtype == dtype and out.shape == (2, 3, 5, 8)
    want = brute_force(*(np.asarray(t.swapaxes(1, 2), np.float32) for t in qkv), 0.0, scale)
    np.testing.assert_allclose(np.asarray(out.swapaxes(1, 2), np.float32), want,
                               atol=1e-5 if dtype == jnp.float32 else 4e-2)
    weight = jnp.arange(8.0)
    stacked = lambda t: jnp.sum(stacked_attention(t, scale).astype(jnp.float32) * weight)  # noqa: E731
    plain = lambda t: jnp.sum(dot_product_attention(  # noqa: E731
        *(p.swapaxes(1, 2) for p in (t[0] * jnp.asarray(scale, dtype), t[1], t[2])))[0]
        .astype(jnp.float32) * weight)
    got, ref = jax.grad(stacked)(qkv), jax.grad(plain)(qkv)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-4 if dtype == jnp.float32 else 5e-2,
                               atol=1e-5 if dtype == jnp.float32 else 5e-2)
    assert " pad" not in str(jax.make_jaxpr(jax.grad(stacked))(qkv))
    assert " pad" in str(jax.make_jaxpr(jax.grad(plain))(qkv))  # the check can fail


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_broadcast_batch_gradient_is_the_batch_sum_without_a_reduction(batch):
    bias = jax.random.normal(jax.random.PRNGKey(5), (1, 3, 4, 4))
    ct = jax.random.randint(jax.random.PRNGKey(6), (batch, 3, 4, 4), -50, 50).astype(
        jnp.float32)  # integers: every summation order gives the same float
    out, vjp = jax.vjp(lambda b: broadcast_batch(b, batch), bias)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, (batch, 3, 4, 4)))
    np.testing.assert_array_equal(vjp(ct)[0], np.asarray(ct).sum(0, keepdims=True))
    def compiled_grad(broadcast):
        grad = jax.grad(lambda b, ct: jnp.sum(broadcast(b) * ct))
        return jax.jit(grad).lower(bias, ct).compile().as_text()

    # XLA's ops, not names; on CPU the sum is adds of halves.
    assert " reduce(" not in compiled_grad(lambda b: broadcast_batch(b, batch))
    plain = compiled_grad(lambda b: jnp.broadcast_to(b, ct.shape))
    assert batch == 1 or " reduce(" in plain  # the check above can fail


def test_bfloat16_on_a_backend_without_cudnn_falls_back_to_xla():
    """Asked for the GPU path where cuDNN is absent (this CPU), the XLA kernel answers:
    bfloat16 output, float32-accurate softmax up to bfloat16 inputs' rounding."""
    q, k, v, bias = qkvb((3, 6, 5), jnp.bfloat16)
    out = fused_dot_product_attention(q, k, v, bias=bias, scale=8**-0.5, backend="gpu")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               brute_force(q, k, v, bias, 8**-0.5), atol=4e-2)


@pytest.mark.parametrize("position", [
    functools.partial(RelativeBias2D),  # CoAtNet: a bias table per head
    functools.partial(RelativeLogits2D),  # BoTNet: content-dependent relative logits
])
def test_module_output_is_the_same_with_and_without_captured_weights(position):
    """Capturing weights runs the explicit kernel, the default runs the fused one: the
    outputs agree, so what a notebook draws is what the model computes."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5, 16))
    layer = Attention(num_heads=2, out_features=16, position=position)
    variables = layer.init(jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(
        jax.random.PRNGKey(2), t.shape), variables)  # nonzero position tables
    fused = layer.apply(variables, x)
    explicit, sown = layer.apply(variables, x, mutable=["attention"])
    assert sown["attention"]  # the explicit path really ran
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
