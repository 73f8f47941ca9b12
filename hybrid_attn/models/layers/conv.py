"""Depthwise and dense convolutions with fast CPU lowerings.

XLA:CPU lowers a grouped convolution with ``feature_group_count = C`` to a slow generic
loop: on an 8x56x56x384 map a 3x3 depthwise convolution took 316 ms forward and 2.6 s for
its kernel gradient, where the same operation written as ``kh * kw`` shifted multiply-adds
(one fused elementwise loop, whose gradients are fused pads and reductions) took 32 ms and
~0.2 s; its kernel gradient pairs each tap's input phase with the shifted output gradient
(:func:`_shifted_vjp`). :func:`depthwise_conv` picks that form on CPU and the native
``lax.conv_general_dilated`` on every other backend (GPU, TPU), per backend at trace time
(:func:`~hybrid_attn.models.layers.platform.platform_dependent`). :class:`DepthwiseConv`
has the variables of ``nn.Conv(C, kernel_size, feature_group_count=C)`` (``kernel``
[kh, kw, 1, C], ``bias`` [C]), so checkpoints and weight converters stay valid.

Dense convolutions (:func:`conv2d`, :class:`Conv`): XLA:CPU's kernel gradient of a 1x1
convolution is slow (8x56x56, 256->64: 72 ms CPU time for forward and both gradients, 33 ms
as a matrix product; a strided 256->512 shortcut 193 ms against 56 ms), so on CPU a 1x1
convolution is a strided slice and a ``dot_general`` over the flattened pixels, and a
convolution over non-overlapping patches (kernel = stride: patch embeddings, Twins' GSA
key reduction, whose input gradient XLA:CPU computed 5x slower) a space-to-depth reshape
and a ``dot_general``.

Larger ungrouped kernels are XLA's own convolution, forward and both gradients, except
that from 128 input channels a strided one onto at most 28x28 or an unstrided one onto at
most 7x7 is one im2col matrix product (:func:`_im2col_dot`). Under XLA:CPU's default
options each convolution, the kernel gradient's too, went to YNNPACK, whose kernel gradient
(a convolution contracting over the batch) was slow: 46.8 ms for a 3x3 convolution on
8x56x56x64 where the forward took 12 ms (2-core Xeon, AVX-512, float32, jax 0.10.2).
:func:`_kernel_grad_rows` (``impl="rows_grad"``) computes it as ``kh`` plain matrix
products instead, ``dy^T`` against the rows of ``kw`` column-shifted copies of the input
(19.8 ms there), and was this module's choice from a 28x28 output up until the programs
compiled with :data:`hybrid_attn.xla_cpu.CPU_LIBRARY_FUSIONS`, which keep convolutions on
XLA's Eigen path: there the native forward and both gradients took 19.8 ms against 26.9
(rows) and 34.7 (im2col) on 56x56x64, 81 against 110 and 146 ms on 112x112x64, 16.3
against 34.0 ms for ResNet's 7x7/2 stem's forward and kernel gradient (2 threads). So the
forms chosen here assume that option (the train step, evaluation, prediction and the bench
compile with it; a program compiled with XLA's defaults gets the same values, more slowly).
:class:`Conv` has the variables of ``nn.Conv`` (``kernel`` [kh, kw, Cin / groups, Cout],
``bias`` [Cout]).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hybrid_attn.models.layers.dense import matmul
from hybrid_attn.models.layers.platform import platform_dependent

Padding = str | int | Sequence[tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _pads(spatial: Sequence[int], window: Sequence[int], strides: Sequence[int],
          padding: Padding) -> tuple[tuple[int, int], ...]:
    """``padding`` (``"SAME"``, ``"VALID"``, an int or per-axis pairs) as explicit pairs."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(spatial, window, strides, padding))
    if isinstance(padding, int):
        return ((padding, padding),) * len(spatial)
    pads = tuple(tuple(p) for p in padding)
    if len(pads) != len(spatial) or any(len(p) != 2 for p in pads):
        raise ValueError(f"padding must be 'SAME', 'VALID', an int or {len(spatial)} "
                         f"(low, high) pairs, got {padding!r}")
    return pads


def _out_pixels(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                pads: tuple[tuple[int, int], ...]) -> int:
    """Output pixels per image of a convolution of an NHWC ``x_shape``."""
    n = 1
    for size, k, s, (lo, hi) in zip(x_shape[1:3], kernel_shape[:2], strides, pads):
        n *= (size + lo + hi - k) // s + 1
    return n


def _native(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
            pads: tuple[tuple[int, int], ...]) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMENSIONS,
                                    feature_group_count=x.shape[-1])


def _shifted(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """Sum over the window of strided slices of the padded map times one kernel tap,
    accumulated in float32 (as the native convolution accumulates)."""
    kh, kw = kernel.shape[:2]
    (sh, sw), (b, h, w, c) = strides, x.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (h + sum(pads[0]) - kh) // sh + 1
    out_w = (w + sum(pads[1]) - kw) // sw + 1
    acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
    y = jnp.zeros((b, out_h, out_w, c), acc)
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(xp, (0, i, j, 0),
                               (b, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c),
                               (1, sh, sw, 1))
            y = y + window.astype(acc) * kernel[i, j, 0].astype(acc)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_vjp(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """:func:`_shifted`, with the kernel gradient taken from shifted slices of the output
    gradient against the input's stride phases, instead of strided slices of the input.

    Tap ``(i, j)`` reads input rows ``s*y + i - top``: phase ``(i - top) % s`` of the input
    (rows ``p::s``) at offset ``(i - top) // s``, so ``dk[i, j]`` is that phase times ``dy``
    shifted by the offset (zero outside). Sliced from the input, XLA:CPU materialised each
    of the ``kh * kw`` slices for its reductions, recomputing the producer of ``x`` (MBConv's
    BatchNorm and GELU) in every one. One 3x3 layer after BatchNorm and GELU, forward and
    backward, batch 8: 8x56x56x384 110.5 -> 76.9 ms (temporaries 331 -> 74 MiB),
    8x112x112x384 at stride 2 192 -> 152 ms (478 -> 294 MiB).
    """
    return _shifted(x, kernel, strides, pads)


def _shifted_vjp_fwd(x, kernel, strides, pads):
    return _shifted(x, kernel, strides, pads), (x, kernel)


def _shifted_vjp_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _shifted(x, kernel, strides, pads), x)
    acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
    (kh, kw), (sh, sw), (ho, wo) = kernel.shape[:2], strides, dy.shape[1:3]
    (top, _), (left, _) = pads
    taps = []
    for i, j in itertools.product(range(kh), range(kw)):
        (p, r), (q, t) = divmod(i - top, sh)[::-1], divmod(j - left, sw)[::-1]
        phase = x[:, p::sh, q::sw].astype(acc)
        hp, wp = phase.shape[1:3]
        shifted = lax.pad(dy.astype(acc), jnp.zeros((), acc),
                          ((0, 0, 0), (r, hp - ho - r, 0), (t, wp - wo - t, 0), (0, 0, 0)))
        taps.append(jnp.sum(phase * shifted, axis=(0, 1, 2)))
    dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return input_vjp(dy)[0], dk


_shifted_vjp.defvjp(_shifted_vjp_fwd, _shifted_vjp_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   padding: Padding = "SAME", impl: str = "auto") -> jax.Array:
    """Depthwise 2-D convolution of NHWC ``x`` [B, H, W, C] with ``kernel`` [kh, kw, 1, C].

    Equal to ``lax.conv_general_dilated(..., feature_group_count=C)``. ``impl="auto"``
    lowers to shifted multiply-adds on CPU and to the native convolution elsewhere;
    ``"shifted"`` and ``"native"`` force one form (for tests and benchmarks).
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2:] != (1, x.shape[-1]):
        raise ValueError("depthwise_conv expects x [B, H, W, C] and kernel [kh, kw, 1, C], "
                         f"got x {x.shape} and kernel {kernel.shape}")
    strides = tuple(strides)
    pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    forms = {"native": _native, "shifted": _shifted_vjp}
    if impl in forms:
        return forms[impl](x, kernel, strides, pads)
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'shifted' or 'native', got {impl!r}")
    return platform_dependent(
        x, kernel,
        cpu=lambda x, k: _shifted_vjp(x, k, strides, pads),
        default=lambda x, k: _native(x, k, strides, pads))


class DepthwiseConv(nn.Module):
    """``nn.Conv(C, kernel_size, feature_group_count=C)`` on the channels of its input,
    with the same variables, computed by :func:`depthwise_conv`."""

    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, c),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias \
            else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = depthwise_conv(x, kernel, self.strides, self.padding)
        return y + bias if bias is not None else y


def _dense_native(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  pads: tuple[tuple[int, int], ...], groups: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMENSIONS,
                                    feature_group_count=groups)


def _pointwise_dot(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """A 1x1 convolution as pad, strided slice and one matrix product over the pixels."""
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    b, h, w, c = x.shape
    if strides != (1, 1):
        x = lax.slice(x, (0, 0, 0, 0), (b, h, w, c), (1, *strides, 1))
    b, h, w, c = x.shape
    y = matmul(x.reshape(b * h * w, c), kernel.reshape(c, -1), impl="narrow_left")
    return y.reshape(b, h, w, -1)


def _patches_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A convolution whose stride equals its kernel and which pads nothing (patch
    embeddings, Twins' GSA key reduction) as a space-to-depth reshape and one matrix
    product; rows and columns past the last whole patch are dropped, as VALID drops them."""
    (p, q), (b, h, w, c) = kernel.shape[:2], x.shape
    oh, ow = h // p, w // q
    x = x[:, :oh * p, :ow * q].reshape(b, oh, p, ow, q, c).transpose(0, 1, 3, 2, 4, 5)
    y = matmul(x.reshape(b * oh * ow, p * q * c), kernel.reshape(p * q * c, -1),
               impl="narrow_left")
    return y.reshape(b, oh, ow, -1)


def _im2col_dot(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """An ungrouped convolution as one matrix product over its ``kh * kw`` strided input
    slices stacked on the channel axis (im2col; the kernel's HWIO order is that stacking
    order). Its gradients are a product and pads (input) and :func:`~hybrid_attn.models.
    layers.dense.matmul`'s weight gradient."""
    (kh, kw, cin, cout), b = kernel.shape, x.shape[0]
    (sh, sw) = strides
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    cols = jnp.concatenate(
        [lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                   (1, sh, sw, 1)) for i in range(kh) for j in range(kw)], axis=-1)
    y = matmul(cols.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout),
               impl="narrow_left")
    return y.reshape(b, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_im2col_grad(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                        pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """:func:`_im2col_dot` when differentiated (training); when not (inference), the
    native convolution unless the output is at most :data:`IM2COL_FORWARD_MAX_PIXELS`.
    Forward alone, batch 8, 1 thread (module docstring's machine), native / product:
    14x14x256 12.5 / 14.6 ms, 56x56x128 at stride 2 13.9 / 18.2 ms, but 7x7x512 16.9 /
    13.7 ms and 14x14x512 at stride 2 18.0 / 13.6 ms (ResNet-50's one-thread inference was
    2-3% slower with the product everywhere)."""
    if _out_pixels(x.shape, kernel.shape, strides, pads) <= IM2COL_FORWARD_MAX_PIXELS:
        return _im2col_dot(x, kernel, strides, pads)
    return _dense_native(x, kernel, strides, pads, 1)


def _native_im2col_grad_fwd(x, kernel, strides, pads):
    return jax.vjp(lambda x, k: _im2col_dot(x, k, strides, pads), x, kernel)


def _native_im2col_grad_bwd(strides, pads, vjp, dy):
    return vjp(dy)


_native_im2col_grad.defvjp(_native_im2col_grad_fwd, _native_im2col_grad_bwd)


def _kernel_grad_rows(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                      strides: tuple[int, int],
                      pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """The kernel gradient of an ungrouped convolution as ``kh`` plain matrix products.

    ``dW[i, j, c, o] = sum_{b, y, x} xpad[b, y*sh + i, x*sw + j, c] * dy[b, y, x, o]``: the
    ``kw`` column-shifted (strided) copies of the padded input stand side by side on the
    channel axis, and kernel row ``i`` is ``dy^T [Cout, B*Ho*Wo] @ rows_i [B*Ho*Wo, kw*Cin]``
    with ``rows_i`` that array's strided row slice, or ``rows_i^T @ dy`` where ``kw * Cin <
    Cout`` (the stems: the narrower operand on the left, as in
    :func:`~hybrid_attn.models.layers.dense.matmul`). Products accumulate in float32.
    """
    kh, kw, cin, cout = kernel_shape
    (sh, sw), (b, ho, wo, _) = strides, dy.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    cols = jnp.concatenate(
        [lax.slice_in_dim(xp, j, j + (wo - 1) * sw + 1, sw, axis=2) for j in range(kw)], axis=-1)
    dy2 = dy.reshape(b * ho * wo, cout)
    rows = [lax.slice_in_dim(cols, i, i + (ho - 1) * sh + 1, sh, axis=1).reshape(-1, kw * cin)
            for i in range(kh)]
    contract = (((0,), (0,)), ((), ()))
    if kw * cin < cout:  # the narrower operand on the left (layers/dense.py): a stem
        grads = [lax.dot_general(r, dy2, contract, preferred_element_type=jnp.float32)
                 for r in rows]
        return jnp.stack(grads).reshape(kh, kw, cin, cout)
    grads = [lax.dot_general(dy2, r, contract, preferred_element_type=jnp.float32)
             for r in rows]
    return jnp.stack(grads).reshape(kh, cout, kw, cin).transpose(0, 2, 3, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_rows_grad(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                      pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """The native ungrouped convolution and its input gradient, with the kernel gradient
    of :func:`_kernel_grad_rows`."""
    return _dense_native(x, kernel, strides, pads, 1)


def _native_rows_grad_fwd(x, kernel, strides, pads):
    return _dense_native(x, kernel, strides, pads, 1), (x, kernel)


def _native_rows_grad_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _dense_native(x, kernel, strides, pads, 1), x)
    dk = _kernel_grad_rows(x, dy, kernel.shape, strides, pads)
    return input_vjp(dy)[0], dk.astype(kernel.dtype)


_native_rows_grad.defvjp(_native_rows_grad_fwd, _native_rows_grad_bwd)

# On CPU, from this many input channels, :func:`conv2d` trains a strided convolution onto at
# most 28x28 output pixels, or an unstrided one onto at most 7x7, as one im2col matrix
# product (:func:`_im2col_dot`); every other ungrouped kernel larger than 1x1 is native
# (XLA's own convolution and gradients, see the module docstring). Forward and both
# gradients, batch 8, 2 / 1 threads, 2026-12-08, compiled with xla_cpu.compiler_options,
# native -> im2col: 7x7x512 18.8 -> 14.9 / 27.5 -> 26.5 ms, stride 2 onto 28x28x128 31.1 ->
# 29.1 / 46.4 -> 42.4, onto 14x14x256 22.2 -> 19.3 / 33.6 -> 34.7, onto 7x7x512 21.4 -> 15.7
# / 31.8 -> 26.6 ms; but unstrided 14x14x256 15.7 -> 18.8 / 24.7 -> 34.0 ms stays native.
IM2COL_MIN_CHANNELS = 128
IM2COL_STRIDED_MAX_PIXELS = 28 * 28
IM2COL_MAX_PIXELS = 7 * 7
IM2COL_FORWARD_MAX_PIXELS = 7 * 7  # and inference takes the product up to this output


def conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = (1, 1),
           padding: Padding = "SAME", feature_group_count: int = 1,
           impl: str = "auto") -> jax.Array:
    """2-D convolution of NHWC ``x`` [B, H, W, Cin] with ``kernel`` [kh, kw, Cin / groups,
    Cout], equal to ``lax.conv_general_dilated``.

    ``impl="auto"`` picks per backend at lowering time. On CPU, for ungrouped convolutions:
    a 1x1 convolution, or one over non-overlapping patches (stride equal to the kernel, no
    padding), is a matrix product (``"dot"``); from :data:`IM2COL_MIN_CHANNELS` input
    channels, a strided one onto at most :data:`IM2COL_STRIDED_MAX_PIXELS` output pixels per
    image or an unstrided one onto at most :data:`IM2COL_MAX_PIXELS` trains as one im2col
    product (``"im2col"``, :func:`_native_im2col_grad`). Every other convolution, and every
    convolution on GPU and TPU, is native. ``"native"``, ``"dot"``, ``"rows_grad"`` (the
    native convolution with :func:`_kernel_grad_rows`) and ``"im2col"`` force one form
    (``"dot"`` only for those two kinds,
    the other two only ungrouped).
    """
    if (x.ndim != 4 or kernel.ndim != 4 or feature_group_count < 1
            or kernel.shape[2] * feature_group_count != x.shape[-1]
            or kernel.shape[3] % feature_group_count):
        raise ValueError("conv2d expects x [B, H, W, Cin] and kernel [kh, kw, Cin / groups, "
                         f"Cout], got x {x.shape}, kernel {kernel.shape} and "
                         f"{feature_group_count} groups")
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    ungrouped = feature_group_count == 1
    patches = (ungrouped and kernel.shape[:2] == strides and kernel.shape[:2] != (1, 1)
               and not any(p for pair in pads for p in pair))
    if ungrouped and kernel.shape[:2] == (1, 1):
        dot = functools.partial(_pointwise_dot, strides=strides, pads=pads)
    elif patches:
        dot = _patches_dot
    else:
        dot = None
    rows_grad = functools.partial(_native_rows_grad, strides=strides, pads=pads) \
        if ungrouped else None
    im2col = functools.partial(_native_im2col_grad, strides=strides, pads=pads) \
        if ungrouped else None
    if impl == "native":
        return _dense_native(x, kernel, strides, pads, feature_group_count)
    if impl in ("dot", "rows_grad", "im2col"):
        form = {"dot": dot, "rows_grad": rows_grad, "im2col": im2col}[impl]
        if form is None:
            raise ValueError(f"impl={impl!r} needs an ungrouped " + (
                "1x1 kernel or non-overlapping unpadded patches" if impl == "dot" else
                "convolution") + f", got kernel {kernel.shape}, strides {strides}, padding "
                f"{pads} and {feature_group_count} groups")
        return form(x, kernel)
    if impl != "auto":
        raise ValueError("impl must be 'auto', 'dot', 'rows_grad', 'im2col' or 'native', "
                         f"got {impl!r}")
    out_pixels = _out_pixels(x.shape, kernel.shape, strides, pads)
    strided = strides != (1, 1)
    by_im2col = x.shape[-1] >= IM2COL_MIN_CHANNELS and out_pixels <= (
        IM2COL_STRIDED_MAX_PIXELS if strided else IM2COL_MAX_PIXELS)
    cpu = dot or (im2col if by_im2col else None)
    if cpu is None:
        return _dense_native(x, kernel, strides, pads, feature_group_count)
    return platform_dependent(
        x, kernel, cpu=cpu, default=lambda x, k: _dense_native(x, k, strides, pads, 1))


class Conv(nn.Module):
    """``nn.Conv`` for NHWC images (2-D kernels), with the same fields used here and the
    same variables, computed by :func:`conv2d`."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: int | tuple[int, int] = 1
    padding: Padding = "SAME"
    use_bias: bool = True
    feature_group_count: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if len(self.kernel_size) != 2:
            raise ValueError(f"Conv expects a 2-D kernel_size, got {self.kernel_size!r}")
        groups = self.feature_group_count
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1] // groups, self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding, groups)
        return y + bias if bias is not None else y
