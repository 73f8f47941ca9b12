"""Max pooling: the strided-slice lowering against a brute-force loop (value and gradient,
ties included) and against nn.max_pool; its CPU gradient has no index reduce-window or scatter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.layers.pooling import max_pool, max_pool3

CASES = [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0))),
         ((3, 2), (1, 2), ((0, 2), (1, 0))), ((2, 3), (2, 1), ((1, 0), (0, 1)))]


def loop_reference(x, window, strides, pads, g):
    """Max pool and the gradient of sum(output * g) by plain loops: each window sends its
    cotangent to its first maximal position in row-major order (padding never wins)."""
    b, h, w, c = x.shape
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-np.inf)
    oh = (h + pt + pb - window[0]) // strides[0] + 1
    ow = (w + pl + pr - window[1]) // strides[1] + 1
    y, dxp = np.zeros((b, oh, ow, c)), np.zeros_like(xp)
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    r, s = i * strides[0], j * strides[1]
                    patch = xp[n, r:r + window[0], s:s + window[1], ch]
                    di, dj = np.unravel_index(np.argmax(patch), patch.shape)  # first max
                    y[n, i, j, ch] = patch[di, dj]
                    dxp[n, r + di, s + dj, ch] += g[n, i, j, ch]
    return y, dxp[:, pt:pt + h, pl:pl + w]


@pytest.mark.parametrize("impl", ["sliced", "native", "auto"])
@pytest.mark.parametrize("window,strides,pads", CASES)
def test_value_and_gradient_match_loop_with_ties(impl, window, strides, pads):
    # Small integers (and ReLU-like zeros): most windows hold ties, and every sum is exact,
    # so the forms must agree bit for bit, ties sent to the same position.
    x = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 7, 9, 3), -2, 3), np.float32)
    x = np.maximum(x, 0)
    y_shape = jax.eval_shape(lambda x: max_pool(x, window, strides, pads, impl="native"),
                             jnp.asarray(x)).shape
    g = np.asarray(jax.random.randint(jax.random.PRNGKey(1), y_shape, -4, 5), np.float32)
    y_ref, dx_ref = loop_reference(x, window, strides, pads, g)
    pool = lambda x: max_pool(x, window, strides, pads, impl=impl)  # noqa: E731
    y, vjp = jax.vjp(pool, jnp.asarray(x))
    np.testing.assert_array_equal(pool(jnp.asarray(x)), y_ref)  # undifferentiated: XLA's own
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], dx_ref)


def test_max_pool3_equals_nn_max_pool_on_real_values():
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(2), (2, 16, 12, 8)))
    g = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 6, 8))
    ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
    y, vjp = jax.vjp(max_pool3, x)
    y_ref, vjp_ref = jax.vjp(ref, x)
    np.testing.assert_array_equal(y, y_ref)
    # Overlapping windows add their cotangents in another order: equal to float rounding.
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)


def test_cpu_gradient_has_no_index_reduce_window_or_scatter():
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 4))

    def op_counts(impl):
        pool = lambda x: max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=impl)  # noqa: E731
        grad = jax.grad(lambda x: jnp.sum(pool(x) ** 2))
        hlo = jax.jit(grad).lower(x).compile().as_text()
        # HLO ops, not names (the stack-frame table holds this test's name).
        return {op: hlo.count(f" {op}(") for op in ("reduce-window", "scatter", "while")}

    # XLA rewrites the select-and-scatter as a second, variadic reduce-window with index
    # maps, then a scatter (a while loop with the tests' classic emitters).
    native = op_counts("native")
    assert native["reduce-window"] == 2 and native["scatter"] + native["while"] == 1
    assert op_counts("auto") == {"reduce-window": 0, "scatter": 0, "while": 0}
    # Not differentiated (inference), the forward stays XLA's reduce-window.
    forward = jax.jit(max_pool3).lower(x).compile().as_text()
    assert forward.count(" reduce-window(") == 1


def test_bad_arguments_are_named():
    x = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(ValueError, match=r"max_pool expects x \[B, H, W, C\], a 2-D window"):
        max_pool(x[0], (3, 3), (2, 2))
    with pytest.raises(ValueError, match="impl must be 'auto', 'sliced' or 'native'"):
        max_pool(x, (3, 3), (2, 2), impl="fast")
