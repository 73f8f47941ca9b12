"""``nn.Dense`` over the last axis of a map or token array, as one 2-D matrix product.

``nn.Dense`` contracts the last axis of an N-D input directly. In the backward pass of a
4-D (NHWC) input XLA:CPU then computes the weight gradient from transposed 4-D copies of
the input and the output gradient, slow transposes, where a 2-D product takes the
transposed operand as it is: Twins-SVT-S's stage-1 MLP (8x56x56, 64 -> 256 -> 64, exact
GELU; 2 threads, float32) took 177 ms for its backward pass against 34 ms with the leading
axes flattened first. Flattening is a free reshape on every backend.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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
        y = lax.dot_general(inputs.reshape(-1, inputs.shape[-1]), kernel,
                            (((1,), (0,)), ((), ())))
        y = y.reshape(*inputs.shape[:-1], self.features)
        return y + bias if bias is not None else y
