"""The ConvNeXt block (Liu et al. 2022, Fig. 4) in the form timm's ``coatnext`` CoAtNet uses
(``maxxvit.ConvNeXtBlock`` with ``conv_mlp=True``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.conv import DepthwiseConv
from hybrid_attn.models.layers.layer_scale import LayerScale
from hybrid_attn.models.layers.mbconv import conv_init, depthwise_init
from hybrid_attn.models.layers.mlp import Mlp
from hybrid_attn.models.layers.norm import LayerNorm
from hybrid_attn.models.layers.pooling import avg_pool2
from hybrid_attn.models.layers.regularization import DropPath

Dtype = Any


class ConvNeXtBlock(nn.Module):
    """``x <- shortcut(x) + DropPath(LayerScale(MLP(LN(DWConv7x7(x)))))``.

    ``DWConv`` is a depthwise 7x7 conv with bias (``features`` may be a multiple of the input
    width: each input channel then feeds ``features / in`` outputs), ``LN`` a LayerNorm (eps
    1e-6), ``MLP`` 1x1 -> GELU -> 1x1 of ``mlp_ratio * features`` hidden channels. With
    ``strides=2`` the conv strides and the shortcut is 2x2 average pooling, then a 1x1 conv
    where the width changes.

    Attributes:
      features: output channels.
      strides: 1, or 2 for the first block of a stage.
      layer_scale: initial LayerScale value; None for none.
      drop_path: stochastic depth rate of the residual branch.
    """

    features: int
    strides: int = 1
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    layer_scale: float | None = 1e-6
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.strides not in (1, 2):
            raise ValueError(f"ConvNeXtBlock strides must be 1 or 2, got {self.strides}")
        channels = x.shape[-1]
        if self.features % channels:
            raise ValueError(f"ConvNeXtBlock: {self.features} output channels are not a "
                             f"multiple of the {channels} input channels of its depthwise conv")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = avg_pool2(x) if self.strides == 2 else x
        if channels != self.features:
            shortcut = nn.Conv(self.features, (1, 1), kernel_init=conv_init, name="shortcut",
                               **kw)(shortcut)
        k, p = self.kernel_size, (self.kernel_size - 1) // 2
        if channels == self.features:
            y = DepthwiseConv((k, k), (self.strides, self.strides), padding=((p, p), (p, p)),
                              kernel_init=depthwise_init, name="dw_conv", **kw)(x)
        else:
            y = nn.Conv(self.features, (k, k), self.strides, padding=((p, p), (p, p)),
                        feature_group_count=channels, kernel_init=depthwise_init,
                        name="dw_conv", **kw)(x)
        y = LayerNorm(epsilon=1e-6, use_fast_variance=False, name="norm", **kw)(y)
        y = Mlp(int(self.mlp_ratio * self.features), name="mlp", **kw)(y, train=train)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, self.param_dtype, name="layer_scale")(y)
        return shortcut + DropPath(self.drop_path)(y, train=train)
