"""CoAtNet's convolutional pieces: the S0 stem and the pre-norm MBConv block.

Both follow Dai et al. 2021 (Sec. 3.3, Table 3) in the form of the published code / timm's
``MbConvBlock`` and ``Stem``: pre-activation BatchNorm, exact GELU, squeeze-excitation
sized from the block's output width, symmetric padding (so timm weights load unchanged).
Fields cover timm's "rw" variants of both (:mod:`hybrid_attn.models.coatnet_rw`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.activation import gelu
from hybrid_attn.models.layers.conv import Conv, DepthwiseConv
from hybrid_attn.models.layers.norm import LayerNorm, batch_norm
from hybrid_attn.models.layers.pooling import avg_pool2
from hybrid_attn.models.layers.regularization import DropPath
from hybrid_attn.models.layers.squeeze_excite import SqueezeExcite

Dtype = Any
StrideAt = Literal["depthwise", "expand", "pool"]
Activation = Callable[[jax.Array], jax.Array]

# EfficientNet / timm initialisation: N(0, 2 / fan_out) for convolutions. For a depthwise
# kernel [k, k, 1, C] timm's fan_out (k*k*C / groups) equals flax's fan_in (k*k).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvStem(nn.Module):
    """Stage S0: 3x3 conv stride 2 -> norm -> activation -> 3x3 conv (no biases).

    No normalisation after the second conv: the first pre-norm block normalises it.

    Attributes:
      features: output channels.
      hidden_features: channels of the first conv; None: ``features`` (the paper). timm's
        rw stems widen in two steps (e.g. 32 then 64).
      norm: "batch" (BatchNorm), or "layer" (LayerNorm, eps 1e-6: timm's ``coatnext``).
      activation: GELU (paper); SiLU in timm's rw models.
    """

    features: int
    hidden_features: int | None = None
    norm: Literal["batch", "layer"] = "batch"
    activation: Activation = gelu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = lambda features, strides, name: Conv(  # noqa: E731
            features, (3, 3), strides, padding=((1, 1), (1, 1)), use_bias=False,
            kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )
        x = conv(self.hidden_features or self.features, 2, "conv1")(x)
        if self.norm == "layer":
            norm = LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="norm1")
        else:
            norm = batch_norm(train, self.dtype, self.param_dtype, "norm1")
        x = self.activation(norm(x))
        return conv(self.features, 1, "conv2")(x)


class MBConv(nn.Module):
    """Pre-norm inverted residual (Dai et al. 2021, Eq. 5 with Conv = MBConv):

        x <- shortcut(x) + DropPath(Proj(SE(DWConv(Expand(BN(x))))))

    ``Expand`` is 1x1 conv -> BN -> GELU to ``expand_ratio * features`` channels, ``DWConv``
    a depthwise kxk conv -> BN -> GELU, ``SE`` squeeze-excitation with a SiLU bottleneck of
    ``se_ratio * features`` channels, ``Proj`` a 1x1 conv with bias to ``features``. With
    ``strides=2`` the shortcut is 2x2 average pooling then a 1x1 conv, and the residual
    branch strides either its depthwise conv (``stride_at="depthwise"``: the published code
    and timm) or its first 1x1 conv (``"expand"``: the paper's formula, whose FLOPs Table 3
    reports; the depthwise conv then runs at a quarter of the positions), or pools 2x2 after
    ``BN`` (``"pool"``: some of timm's rw models).

    Attributes:
      features: output channels.
      strides: 1, or 2 for the first block of a stage.
      stride_at: where the residual branch downsamples, see above.
      drop_path: stochastic depth rate of the residual branch.
      expand_input: size the expansion from the block's input width and the SE bottleneck
        as ``se_ratio`` of the expanded width (timm rw) instead of both from ``features``.
      pre_norm_act: apply ``activation`` after the pre-norm BN too (timm rw).
      se_early: SE between ``DWConv``'s conv and its BN instead of after its activation.
      se_activation: the SE bottleneck's activation (SiLU; ReLU in some timm rw models).
      output_bias: whether ``Proj`` and the shortcut conv have biases.
      shortcut_pool: the shortcut's downsampling (2x2 average pooling; timm's ``max``
        downsampling uses :func:`~hybrid_attn.models.layers.pooling.max_pool3`).
    """

    features: int
    strides: int = 1
    expand_ratio: float = 4.0
    se_ratio: float = 0.25
    kernel_size: int = 3
    stride_at: StrideAt = "depthwise"
    drop_path: float = 0.0
    activation: Activation = gelu
    expand_input: bool = False
    pre_norm_act: bool = False
    se_early: bool = False
    se_activation: Activation = nn.silu
    output_bias: bool = True
    shortcut_pool: Activation = avg_pool2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.strides not in (1, 2):
            raise ValueError(f"MBConv strides must be 1 or 2, got {self.strides}")
        if self.stride_at not in ("depthwise", "expand", "pool"):
            raise ValueError(
                f"stride_at must be 'depthwise', 'expand' or 'pool', got {self.stride_at!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name: batch_norm(train, self.dtype, self.param_dtype, name)  # noqa: E731
        hidden = int((x.shape[-1] if self.expand_input else self.features) * self.expand_ratio)
        s = self.strides
        expand_s, dw_s = {"expand": (s, 1), "depthwise": (1, s), "pool": (1, 1)}[self.stride_at]

        shortcut = self.shortcut_pool(x) if s == 2 else x
        if shortcut.shape[-1] != self.features:
            shortcut = Conv(self.features, (1, 1), use_bias=self.output_bias,
                               kernel_init=conv_init, name="shortcut", **kw)(shortcut)

        y = bn("pre_norm")(x)
        if self.pre_norm_act:
            y = self.activation(y)
        if self.stride_at == "pool" and s == 2:
            y = avg_pool2(y)
        y = Conv(hidden, (1, 1), expand_s, use_bias=False, kernel_init=conv_init,
                    name="expand_conv", **kw)(y)
        y = self.activation(bn("expand_norm")(y))
        k, p = self.kernel_size, (self.kernel_size - 1) // 2
        y = DepthwiseConv((k, k), (dw_s, dw_s), padding=((p, p), (p, p)), use_bias=False,
                          kernel_init=depthwise_init, name="dw_conv", **kw)(y)
        se = SqueezeExcite(int(self.se_ratio * (hidden if self.expand_input else self.features)),
                           activation=self.se_activation, name="se", **kw)
        y = self.activation(bn("dw_norm")(se(y) if self.se_early else y))
        y = y if self.se_early else se(y)
        y = Conv(self.features, (1, 1), use_bias=self.output_bias, kernel_init=conv_init,
                    name="project_conv", **kw)(y)
        return shortcut + DropPath(self.drop_path)(y, train=train)
