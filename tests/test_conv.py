"""Depthwise and dense convolutions: every lowering against lax.conv and a brute-force loop,
forward and both gradients; the modules' variables and outputs against nn.Conv's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.layers.conv import Conv, DepthwiseConv, conv2d, depthwise_conv

# The kernel gradient pairs each tap's input phase with the output gradient shifted by the
# tap's offset: strides, VALID and unequal pads each move that offset.
CASES = [((1, 1), "SAME"), ((2, 2), "SAME"), ((2, 1), "VALID"), ((2, 2), ((1, 0), (2, 1))),
         ((1, 1), "VALID"), ((1, 1), ((2, 0), (0, 1)))]


def _pads(h, w, k, strides, padding):
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":  # total padding so that out = ceil(in / stride), low half first
        out = [-(-n // s) for n, s in zip((h, w), strides, strict=True)]
        total = [max((o - 1) * s + k - n, 0) for o, s, n in zip(out, strides, (h, w), strict=True)]
        return tuple((t // 2, t - t // 2) for t in total)
    return padding


def loop_reference(x, kernel, strides, padding, g):
    """Output, and the gradients of sum(output * g) w.r.t. x and kernel, by plain loops."""
    b, h, w, c = x.shape
    k = kernel.shape[0]
    (pt, pb), (pl, pr) = _pads(h, w, k, strides, padding)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - k) // strides[0] + 1
    ow = (w + pl + pr - k) // strides[1] + 1
    y = np.zeros((b, oh, ow, c))
    dxp, dk = np.zeros_like(xp), np.zeros_like(kernel)
    for i in range(oh):
        for j in range(ow):
            for di in range(k):
                for dj in range(k):
                    r, s = i * strides[0] + di, j * strides[1] + dj
                    y[:, i, j] += xp[:, r, s] * kernel[di, dj, 0]
                    dxp[:, r, s] += g[:, i, j] * kernel[di, dj, 0]
                    dk[di, dj, 0] += (xp[:, r, s] * g[:, i, j]).sum(0)
    return y, dxp[:, pt:pt + h, pl:pl + w], dk


def _inputs(strides, padding):
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 5)), np.float64)
    kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 5)), np.float64)
    out_shape = jax.eval_shape(
        lambda: depthwise_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                               strides, padding, impl="native")).shape
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(2), out_shape), np.float64)
    return x, kernel, g


@pytest.mark.parametrize("impl", ["shifted", "native", "auto"])
@pytest.mark.parametrize("strides,padding", CASES)
def test_forward_and_gradients_match_loop_reference(impl, strides, padding):
    x, kernel, g = _inputs(strides, padding)
    y_ref, dx_ref, dk_ref = loop_reference(x, kernel, strides, padding, g)

    def f(x, k):
        return depthwise_conv(x, k, strides, padding, impl=impl)

    xf, kf = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
    y, vjp = jax.vjp(f, xf, kf)
    dx, dk = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5)
    np.testing.assert_allclose(dk, dk_ref, atol=1e-4)


def test_cpu_lowering_has_no_convolution_and_matches_lax_conv():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 10, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 1, 8))

    def loss(impl):
        return lambda x, k: jnp.sum(depthwise_conv(x, k, (2, 2), impl=impl) ** 2)

    hlo = jax.jit(jax.grad(loss("auto"), argnums=(0, 1))).lower(x, kernel).compile().as_text()
    assert " convolution(" not in hlo and " conditional(" not in hlo  # HLO ops, not names
    ref = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", feature_group_count=8,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(depthwise_conv(x, kernel, (2, 2)), ref, atol=1e-5)
    for a, b in zip(jax.grad(loss("auto"), argnums=(0, 1))(x, kernel),
                    jax.grad(loss("native"), argnums=(0, 1))(x, kernel), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_accumulates_like_the_native_convolution():
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 16), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.PRNGKey(6), (3, 3, 1, 16), jnp.bfloat16)
    y = depthwise_conv(x, kernel)
    assert y.dtype == jnp.bfloat16
    exact = depthwise_conv(x.astype(jnp.float32), kernel.astype(jnp.float32), impl="native")
    # One bf16 rounding of the float32 sum, not nine.
    np.testing.assert_allclose(y.astype(jnp.float32), exact, rtol=1e-2, atol=1e-2)


def test_module_has_nn_conv_variables_and_output():
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 9, 6, 12))
    conv = nn.Conv(12, (3, 3), strides=2, padding="SAME", feature_group_count=12)
    variables = conv.init(jax.random.PRNGKey(8), x)
    ours = DepthwiseConv(strides=(2, 2))
    shapes = jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(8), x))
    assert shapes == jax.tree_util.tree_map(jnp.shape, variables)
    np.testing.assert_allclose(ours.apply(variables, x), conv.apply(variables, x), atol=1e-5)
    y = DepthwiseConv(dtype=jnp.bfloat16, use_bias=False).apply(
        {"params": {"kernel": variables["params"]["kernel"]}}, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 9, 6, 12)


def test_bad_shapes_and_options_are_named():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"kernel \[kh, kw, 1, C\], got x \(1, 8, 8, 4\)"):
        depthwise_conv(x, jnp.zeros((3, 3, 4, 4)))
    with pytest.raises(ValueError, match="impl must be 'auto', 'shifted' or 'native'"):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 4)), impl="fast")
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID', an int or 2"):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 4)), padding=((1, 1),))


def dense_loop_reference(x, kernel, strides, padding, g):
    """Dense conv output and the gradients of sum(output * g), by plain loops."""
    b, h, w, _ = x.shape
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = _pads(h, w, kh, strides, padding)  # SAME only with square kernels
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - kh) // strides[0] + 1
    ow = (w + pl + pr - kw) // strides[1] + 1
    y = np.zeros((b, oh, ow, kernel.shape[-1]))
    dxp, dk = np.zeros_like(xp), np.zeros_like(kernel)
    for i in range(oh):
        for j in range(ow):
            for di in range(kh):
                for dj in range(kw):
                    r, s = i * strides[0] + di, j * strides[1] + dj
                    y[:, i, j] += xp[:, r, s] @ kernel[di, dj]
                    dxp[:, r, s] += g[:, i, j] @ kernel[di, dj].T
                    dk[di, dj] += xp[:, r, s].T @ g[:, i, j]
    return y, dxp[:, pt:pt + h, pl:pl + w], dk


def check_dense_against_loop(x, kernel, strides, padding, impl, seed):
    """conv2d's output, undifferentiated (inference: some forms have their own forward
    there) and under ``jax.vjp``, and both gradients against the loop; returns the loop's
    output."""
    xf, kf = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
    conv = lambda x, k: conv2d(x, k, strides, padding, impl=impl)  # noqa: E731
    y, vjp = jax.vjp(conv, xf, kf)
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), y.shape), np.float64)
    y_ref, dx_ref, dk_ref = dense_loop_reference(x, kernel, strides, padding, g)
    dx, dk = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(conv(xf, kf), y_ref, atol=1e-4)
    np.testing.assert_allclose(y, y_ref, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-4)
    np.testing.assert_allclose(dk, dk_ref, atol=1e-4)
    return y_ref


DENSE_CASES = [(1, (1, 1), "SAME"), (1, (2, 2), "SAME"), (1, (2, 1), ((1, 0), (0, 2))),
               (1, (2, 2), "VALID"), (3, (1, 1), "SAME"), (3, (2, 2), ((1, 1), (1, 1))),
               (2, (2, 2), "VALID"), (3, (3, 3), "VALID"), (2, (2, 2), ((1, 0), (0, 1)))]


@pytest.mark.parametrize("impl", ["dot", "native", "rows_grad", "im2col", "auto"])
@pytest.mark.parametrize("k,strides,padding", DENSE_CASES)
def test_dense_forward_and_gradients_match_loop_and_lax_conv(impl, k, strides, padding):
    if impl == "dot" and k != 1 and (strides != (k, k) or padding != "VALID"):
        pytest.skip("the dot form is for 1x1 kernels and non-overlapping unpadded patches")
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(10), (2, 9, 7, 5)), np.float64)
    kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(11), (k, k, 5, 6)), np.float64)
    y_ref = check_dense_against_loop(x, kernel, strides, padding, impl, seed=12)
    lax_conv = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), strides, padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(lax_conv, y_ref, atol=1e-4)  # the loop reads padding as lax


@pytest.mark.parametrize("strides,padding", [((1, 1), ((2, 0), (1, 3))), ((2, 1), ((1, 2), (0, 0))),
                                             ((1, 2), ((0, 1), (2, 2)))])
@pytest.mark.parametrize("impl,cin", [("rows_grad", 4), ("rows_grad", 1), ("im2col", 4)])
def test_kernel_gradient_by_rows_matches_loop_for_non_square_kernels(strides, padding, impl,
                                                                     cin):
    """Rows must pair kernel row i with input row y*sh + i and column j with x*sw + j (and
    im2col's stacking must follow the kernel's HWIO order): a 3x5 kernel with unequal
    strides and padding tells rows from columns."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(20), (2, 9, 11, cin)), np.float64)
    # cin 1: 5 x 1 < 6 outputs, the stems' orientation (rows on the left)
    kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(21), (3, 5, cin, 6)), np.float64)
    check_dense_against_loop(x, kernel, strides, padding, impl, seed=22)


def test_kernel_gradient_by_rows_in_bfloat16_is_close_to_float32():
    x = jax.random.normal(jax.random.PRNGKey(23), (4, 16, 16, 32))
    kernel = jax.random.normal(jax.random.PRNGKey(24), (3, 3, 32, 8)) * 0.1
    g = jax.random.normal(jax.random.PRNGKey(25), (4, 16, 16, 8))

    def kernel_grad(impl, dtype):
        _, vjp = jax.vjp(lambda k: conv2d(x.astype(dtype), k, 1, "SAME", impl=impl),
                         kernel.astype(dtype))
        return vjp(g.astype(dtype))[0]

    ref = kernel_grad("native", jnp.float32)
    rows = kernel_grad("rows_grad", jnp.bfloat16)
    assert rows.dtype == jnp.bfloat16
    # bfloat16 inputs and output (8-bit mantissas); the products themselves accumulate in
    # float32 (XLA:CPU does so for bfloat16 dots even without preferred_element_type).
    np.testing.assert_allclose(rows.astype(jnp.float32), ref, rtol=0.02,
                               atol=0.02 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("side,channels,out", [(28, 16, 8), (14, 16, 8), (28, 3, 16)])
def test_cpu_lowering_of_3x3_convolutions_is_native_unless_rows_are_asked_for(side, channels,
                                                                               out):
    """On CPU ``auto`` keeps XLA's convolutions for a 3x3 kernel, forward and both
    gradients (three convolutions); ``impl="rows_grad"`` computes the kernel gradient as
    matrix products (two convolutions left: forward and input gradient)."""
    x = jax.random.normal(jax.random.PRNGKey(26), (2, side, side, channels))
    kernel = jax.random.normal(jax.random.PRNGKey(27), (3, 3, channels, out))
    for impl, convs in (("auto", 3), ("rows_grad", 2)):
        grad = jax.grad(lambda x, k, impl=impl: jnp.sum(conv2d(x, k, 1, "SAME", impl=impl) ** 2),
                        argnums=(0, 1))
        hlo = jax.jit(grad).lower(x, kernel).compile().as_text()
        assert hlo.count(" convolution(") == convs, impl


@pytest.mark.parametrize("side,channels,strides,convs", [
    (7, 128, 1, 0), (28, 128, 2, 0), (7, 256, 2, 0),  # im2col: 7x7, or strided onto <= 28x28
    (14, 128, 1, 3), (7, 64, 1, 3), (28, 128, 1, 3), (56, 64, 2, 3)])  # native
def test_cpu_lowering_of_small_wide_convolutions_is_one_product(side, channels, strides,
                                                                 convs):
    x = jax.random.normal(jax.random.PRNGKey(28), (1, side * strides, side * strides, channels))
    kernel = jax.random.normal(jax.random.PRNGKey(29), (3, 3, channels, 8))
    grad = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, strides, "SAME") ** 2), argnums=(0, 1))
    hlo = jax.jit(grad).lower(x, kernel).compile().as_text()
    assert hlo.count(" convolution(") == convs


@pytest.mark.parametrize("k,padding", [(1, "SAME"), (2, "VALID")])
def test_dense_cpu_lowering_of_1x1_and_patches_is_a_dot(k, padding):
    x = jax.random.normal(jax.random.PRNGKey(13), (2, 8, 9, 16))
    kernel = jax.random.normal(jax.random.PRNGKey(14), (k, k, 16, 32))
    grad = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, 2, padding) ** 2), argnums=(0, 1))
    hlo = jax.jit(grad).lower(x, kernel).compile().as_text()
    assert " convolution(" not in hlo and " dot(" in hlo  # HLO ops, not names


def test_dense_module_has_nn_conv_variables_and_output():
    x = jax.random.normal(jax.random.PRNGKey(15), (2, 9, 6, 12))
    for kw in (dict(features=8, kernel_size=(1, 1), strides=2, use_bias=False),
               dict(features=8, kernel_size=(3, 3), padding=((1, 1), (1, 1))),
               dict(features=8, kernel_size=(3, 3), feature_group_count=4),
               dict(features=8, kernel_size=(2, 2), strides=2, padding="VALID")):
        ref = nn.Conv(**kw)
        variables = ref.init(jax.random.PRNGKey(16), x)
        ours = Conv(**kw)
        # Same names, shapes and (same key) initial values: checkpoints stay valid.
        init = ours.init(jax.random.PRNGKey(16), x)
        jax.tree.map(np.testing.assert_array_equal, init, variables)
        np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                                   atol=1e-5)
    y = Conv(8, (1, 1), dtype=jnp.bfloat16).apply(
        Conv(8, (1, 1)).init(jax.random.PRNGKey(17), x), x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 9, 6, 8)


def test_dense_bad_shapes_and_options_are_named():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"kernel \[kh, kw, Cin / groups, Cout\], got x"):
        conv2d(x, jnp.zeros((3, 3, 3, 4)))
    with pytest.raises(ValueError, match="impl='dot' needs an ungrouped 1x1 kernel or non-"):
        conv2d(x, jnp.zeros((3, 3, 4, 4)), impl="dot")
    with pytest.raises(ValueError, match="impl must be 'auto', 'dot', 'rows_grad', 'im2col'"):
        conv2d(x, jnp.zeros((1, 1, 4, 4)), impl="fast")
    with pytest.raises(ValueError, match="impl='rows_grad' needs an ungrouped convolution, got"):
        conv2d(x, jnp.zeros((3, 3, 2, 4)), feature_group_count=2, impl="rows_grad")
    with pytest.raises(ValueError, match="impl='im2col' needs an ungrouped convolution, got"):
        conv2d(x, jnp.zeros((3, 3, 2, 4)), feature_group_count=2, impl="im2col")
