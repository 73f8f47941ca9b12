"""``nn.Dense`` over the last axis of a map or token array, as one 2-D matrix product.

``nn.Dense`` contracts the last axis of an N-D input directly. In the backward pass of a
4-D (NHWC) input XLA:CPU then computes the weight gradient from transposed 4-D copies of
the input and the output gradient, slow transposes, where a 2-D product takes the
transposed operand as it is: Twins-SVT-S's stage-1 MLP (8x56x56, 64 -> 256 -> 64, exact
GELU; 2 threads, float32) took 177 ms for its backward pass against 34 ms with the leading
axes flattened first. Flattening is a free reshape on every backend.

The product itself is :func:`matmul`. On CPU its weight gradient ``x^T dy`` puts the operand
with fewer columns on the left: XLA:CPU's (YNNPACK's) product that contracts the leading
axes of both operands is fast when its left operand is the narrower one and up to 2x slower
the other way round, so for a layer that narrows (``in > out``: an MLP's ``fc2``, a 1x1
reduce convolution, a patch merge) the gradient is computed as ``(dy^T x)^T``, whose
transpose is of the small weight-shaped result. One thread, float32, a 2-core Xeon
(AVX-512), jax 0.10.2: the weight gradient of a [25088, 256] -> 64 layer took 12.6 ms
directly and 6.5 ms transposed; [1568, 1024] -> 256 8.0 and 4.9 ms. Where the layer widens
the direct form is the fast one and is kept. GPU and TPU keep XLA's own gradient.

That transpose is not free: XLA:CPU fuses it into the gradient's consumers (the optimizer
update, the gradient norm), each of which then reads the weight gradient across its rows,
slowly once the weight outgrows the cache. So the transposed form is taken only when ``x``
has at least as many rows as columns, where the product's saving wins. Weight gradient plus
an AdamW update (three fused consumers), one thread, transposed / direct: [25088, 256] ->
64 7.3 / 13.5 ms, [1568, 1024] -> 256 6.0 / 8.7, [1568, 1536] -> 384 14.4 / 15.5, but
[392, 2048] -> 512 11.5 / 7.9 and [392, 3072] -> 768 (CoAtNet-0's stage-4 ``fc2``) 47.1 /
18.2 ms. In the bench's train step (batch 8, compiled both ways in one process and run
alternately, 14 steps each) that took CoAtNet-0 from 3409 to 3301 ms at one thread and
1902 to 1883 ms at two, ResNet-50 1169 to 1151 ms at two (2194 / 2212 ms at one) and left
Twins-SVT-S as it was (1621 / 1618 ms at one).

The bias is added to the 2-D product, before the leading axes come back, so that its
gradient is a column sum of the same 2-D output gradient the two products read. Added to
the N-D output, its gradient summed the N-D gradient, and where that gradient arrives
transposed (Twins' LSA ``qkv``, from the windows) XLA:CPU computed the transpose twice, once
for the products and once for the sum: 2910 against 2883 fusions in Twins-SVT-S's train
step, which took 1622 -> 1603 ms at one thread and 966 -> 966 ms at two (CoAtNet-0 1839 ->
1818 ms at two; compiled both ways in one process, alternated, 16 steps each).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hybrid_attn.models.layers.platform import platform_dependent


def _plain_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())))


@jax.custom_vjp
def _matmul_narrow_left(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` whose weight gradient puts the narrower operand on the left."""
    return _plain_matmul(x, w)


def _matmul_narrow_left_fwd(x, w):
    return _plain_matmul(x, w), (x, w)


def _matmul_narrow_left_bwd(residuals, dy):
    x, w = residuals
    dx = lax.dot_general(dy, w, (((1,), (1,)), ((), ())))
    if x.shape[1] > dy.shape[1] and x.shape[0] >= x.shape[1]:  # dW = (dy^T x)^T
        # The barrier keeps XLA's simplifier from folding the transpose back into the
        # product (it would swap the operands again).
        dw = lax.optimization_barrier(lax.dot_general(dy, x, (((0,), (0,)), ((), ())))).T
    else:
        dw = lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_narrow_left.defvjp(_matmul_narrow_left_fwd, _matmul_narrow_left_bwd)


def matmul(x: jax.Array, w: jax.Array, impl: str = "auto") -> jax.Array:
    """``x [M, K] @ w [K, N]``, equal to ``lax.dot_general``; on CPU its weight gradient
    takes the faster orientation (module docstring). ``impl``: ``"auto"`` (per backend),
    ``"narrow_left"`` (the CPU form) or ``"native"`` (XLA's gradient), for tests."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"matmul expects x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    if impl == "native":
        return _plain_matmul(x, w)
    if impl == "narrow_left":
        return _matmul_narrow_left(x, w)
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'narrow_left' or 'native', got {impl!r}")
    return platform_dependent(x, w, cpu=_matmul_narrow_left, default=_plain_matmul)


class Dense(nn.Module):
    """``nn.Dense`` with the same fields used here and the same variables (``kernel``
    [in, out], ``bias`` [out], initialised alike), computed on the input's leading axes
    flattened into one; the output keeps the input's leading shape."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = matmul(inputs.reshape(-1, inputs.shape[-1]), kernel)
        if bias is not None:  # on the 2-D product: its gradient sums the same 2-D array
            y = y + bias
        return y.reshape(*inputs.shape[:-1], self.features)
