"""The house norms.

:func:`batch_norm` (:class:`BatchNorm`), shared by every convolutional family (ResNet,
BoTNet, SASA, MBConv): PyTorch's defaults (its momentum 0.1 is flax's 0.9, eps 1e-5) so
that imported running statistics mean the same thing here, float32 statistics whatever the
compute dtype, and its training gradient written out on CPU.

:class:`LayerNorm`, every transformer family's (Twins, CoAtNet): flax's LayerNorm with its
gradient written out on CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from jax import lax

from hybrid_attn.models.layers.platform import platform_dependent

Dtype = Any


def batch_norm(
    train: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    scale_init: nn.initializers.Initializer = nn.initializers.ones,
    epsilon: float = 1e-5,
    written_backward: bool = False,
) -> BatchNorm:
    """A BatchNorm named ``name``: batch statistics when ``train``, running ones otherwise.

    ``scale_init=zeros`` starts a residual branch's last BatchNorm at zero (Goyal et al.
    2017), so a fresh block is the identity. ``epsilon``: PyTorch's default unless the
    published model sets another (timm's BatchNorm transformer blocks use 1e-6).
    ``written_backward``: :class:`BatchNorm`'s written-out training gradient on CPU (the
    ResNet blocks and stem take it; off, autodiff of flax's computation).
    """
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                     scale_init=scale_init, dtype=dtype, param_dtype=param_dtype,
                     written_backward=written_backward, name=name)


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` over every axis but the last, as :func:`batch_norm` sets it
    (float32 statistics, one-pass variance, no cross-device axis name: under ``jax.jit``
    the batch axis of a global array is already the whole batch), with the same variables
    (``scale``, ``bias``; ``batch_stats`` ``mean`` and ``var``) and running-average update,
    and its training gradient written out on CPU.

    On other backends the training forward is flax's, differentiated by autodiff. On
    XLA:CPU (:func:`batch_norm_cpu`) the backward pass is the textbook one,
    ``dx = scale * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` over the batch and
    spatial axes, from the saved input and per-channel statistics, where autodiff
    differentiates the statistics through every use. BatchNorm and ReLU forward and
    backward, one thread, float32, 2-core Xeon (AVX-512), jax 0.10.2: [8, 56, 56, 256]
    29.5 -> 23.9 ms, [8, 28, 28, 512] 12.6 -> 10.9 ms, [8, 112, 112, 64] 29.0 -> 22.6 ms.
    In the bench's train step (two threads, compiled both ways in one process and
    alternated) it took ResNet-50 from 1297 to 1232 ms, but CoAtNet-0 from 1953 to 2076
    ms (its MBConv BatchNorms, which sit between depthwise convolutions and GELUs), so it is
    a switch, ``written_backward``: on in ResNet's blocks and stem (ResNet, BoTNet, SASA),
    off elsewhere, where the training forward is flax's, differentiated by autodiff.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    written_backward: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        out_dtype = jnp.dtype(canonicalize_dtype(x, scale, bias, dtype=self.dtype))
        eps = float(self.epsilon)
        if self.use_running_average:
            return _batch_normalize(x, ra_mean.value, ra_var.value, scale, bias, eps, out_dtype)
        def plain(x, s, b):
            mean, var = _batch_statistics(x)
            return _batch_normalize(x, mean, var, s, b, eps, out_dtype), mean, var

        if self.written_backward:  # the statistics come out of the one custom function
            y, mean, var = platform_dependent(
                x, scale, bias, cpu=lambda x, s, b: batch_norm_cpu(x, s, b, eps, out_dtype),
                default=plain)
        else:
            y, mean, var = plain(x, scale, bias)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 per-channel mean and one-pass variance over every axis but the last."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(rows, axis=0)
    return mean, jnp.maximum(jnp.mean(rows * rows, axis=0) - mean * mean, 0.0)


def _normalize(x, mean, rstd, scale, bias, out_dtype):
    """flax's ``(x - mean) * (rstd * scale) + bias`` (``rstd = rsqrt(var + eps)``), in
    ``out_dtype``; the statistics broadcast against ``x`` (per row or per channel)."""
    return ((x - mean) * (rstd * scale) + bias).astype(out_dtype)


def _batch_normalize(x, mean, var, scale, bias, epsilon, out_dtype):
    """flax's BatchNorm normalisation with per-channel ``mean`` and ``var``."""
    return _normalize(x, mean, lax.rsqrt(var + epsilon), scale, bias, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                   out_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:class:`BatchNorm`'s training function with the backward pass written out: the
    output and the float32 batch ``mean`` and ``var`` (for the running averages, so that
    they are not computed a second time). It keeps ``x`` and the per-channel mean and
    ``rsqrt(var + eps)``; the statistics' own cotangents (zero when they only feed the
    running averages) are included."""
    mean, var = _batch_statistics(x)
    return _batch_normalize(x, mean, var, scale, bias, epsilon, out_dtype), mean, var


def _batch_norm_cpu_fwd(x, scale, bias, epsilon, out_dtype):
    mean, var = _batch_statistics(x)
    rstd = lax.rsqrt(var + epsilon)
    y = _normalize(x, mean, rstd, scale, bias, out_dtype)
    return (y, mean, var), (x, mean, rstd, scale, bias)


def _batch_norm_cpu_bwd(epsilon, out_dtype, residuals, cotangents):
    x, mean, rstd, scale, bias = residuals
    d_y, d_mean, d_var = cotangents
    rows = lambda t: t.reshape(-1, t.shape[-1]).astype(mean.dtype)  # noqa: E731
    x2, d_y2 = rows(x), rows(d_y)
    count = x2.shape[0]
    x_hat = (x2 - mean) * rstd
    d_bias = jnp.sum(d_y2, axis=0)
    d_scale = jnp.sum(d_y2 * x_hat, axis=0)
    d_x = (scale.astype(mean.dtype) * rstd) * (d_y2 - d_bias / count - x_hat * (d_scale / count))
    d_x = d_x + (d_mean + 2.0 * d_var * (x2 - mean)) / count  # mean and E[x^2] - mean^2
    return (d_x.reshape(x.shape).astype(x.dtype), d_scale.astype(scale.dtype),
            d_bias.astype(bias.dtype))


batch_norm_cpu.defvjp(_batch_norm_cpu_fwd, _batch_norm_cpu_bwd)


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` over the last axis (the same ``scale`` / ``bias`` params and
    initialisers, float32 statistics whatever the compute dtype, the output in ``dtype`` or
    else the promoted input and parameter dtype), with its gradient written out on CPU.

    ``use_fast_variance``: ``E[x^2] - E[x]^2`` in one pass over ``x`` (flax's default) or
    ``E[(x - E[x])^2]`` (timm's CoAtNet wants the two-pass form).

    On other backends it is flax's computation, differentiated by autodiff. On XLA:CPU
    (:func:`layer_norm_cpu`) the backward pass is the textbook one,
    ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` with ``g = dy * scale``, from
    the saved input and per-row statistics. Autodiff of flax's form differentiates the
    full-size ``rsqrt(var) * scale`` product and the mean through every use, and XLA:CPU
    materialises the broadcast row statistics for its YNNPACK reductions: on a 2-core
    Xeon (AVX-512), one thread, jax 0.10.2, float32, forward and backward of Twins-SVT-S's
    stage-1 norm ([8, 56, 56, 64]) took 6.5 against 5.2 ms, and of a stage-3 norm
    ([8, 14, 14, 256]) 1.26 against 1.14 ms (torch's: 2.9 and 0.75 ms).
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_fast_variance: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        out_dtype = canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        options = (float(self.epsilon), bool(self.use_fast_variance), jnp.dtype(out_dtype))
        return platform_dependent(
            x, scale, bias,
            cpu=lambda x, s, b: layer_norm_cpu(x, s, b, *options),
            default=lambda x, s, b: _layer_norm(x, s, b, *options))


def _statistics(x: jax.Array, fast_variance: bool) -> tuple[jax.Array, jax.Array]:
    """Float32 mean and variance over the last axis (kept as a size-1 axis), as flax's."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    if fast_variance:
        var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    else:
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return mean, var


def _layer_norm(x, scale, bias, epsilon, fast_variance, out_dtype):
    """flax.linen.LayerNorm's computation: ``(x - mean) * (rsqrt(var + eps) * scale) + bias``."""
    mean, var = _statistics(x, fast_variance)
    return _normalize(x, mean, lax.rsqrt(var + epsilon), scale, bias, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                   fast_variance: bool, out_dtype: Any) -> jax.Array:
    """:class:`LayerNorm`'s function (last axis) with the backward pass written out: it
    keeps ``x`` (which the residual stream keeps anyway) and the float32 row mean and
    ``rsqrt(var + eps)``, and recomputes ``x_hat`` from them."""
    return _layer_norm(x, scale, bias, epsilon, fast_variance, out_dtype)


def _layer_norm_cpu_fwd(x, scale, bias, epsilon, fast_variance, out_dtype):
    mean, var = _statistics(x, fast_variance)
    rstd = lax.rsqrt(var + epsilon)
    return _normalize(x, mean, rstd, scale, bias, out_dtype), (x, mean, rstd, scale, bias)


def _layer_norm_cpu_bwd(epsilon, fast_variance, out_dtype, residuals, d_y):
    x, mean, rstd, scale, bias = residuals
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731 (2-D: the row terms broadcast once)
    x2, mean2, rstd2 = rows(x).astype(mean.dtype), rows(mean), rows(rstd)
    d_y2 = rows(d_y).astype(mean.dtype)
    x_hat = (x2 - mean2) * rstd2
    g = d_y2 * scale.astype(mean.dtype)
    g_mean = jnp.mean(g, axis=-1, keepdims=True)
    gx_mean = jnp.mean(g * x_hat, axis=-1, keepdims=True)
    d_x = rstd2 * (g - g_mean - x_hat * gx_mean)
    d_scale = jnp.sum(d_y2 * x_hat, axis=0)
    d_bias = jnp.sum(d_y2, axis=0)
    return (d_x.reshape(x.shape).astype(x.dtype), d_scale.astype(scale.dtype),
            d_bias.astype(bias.dtype))


layer_norm_cpu.defvjp(_layer_norm_cpu_fwd, _layer_norm_cpu_bwd)
