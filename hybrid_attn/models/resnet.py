"""Bottleneck ResNets (He et al. 2016), the baseline every hybrid family is measured against.

The network is written once with one extension mechanism, methods that a subclass
overrides, so BoTNet, SASA and the non-local baseline are ResNets with some operations
swapped rather than copies:

* :meth:`ResNet.stem_factory`: the stem, a factory ``stem(name="stem")`` returning a module
  called as ``m(x, train=)``; the standard 7x7/2 conv + BN + ReLU + 3x3/2 max pool
  (:class:`ConvStem`) unless overridden (SASA's attention stem).
* :meth:`ResNet.block_spatial`: each bottleneck's spatial operation: None (the 3x3 conv
  carrying the stride) or a :data:`SpatialFactory`, called as ``factory(features=...,
  strides=..., name="spatial")`` and returning a module called as ``m(x, train=)`` that
  maps ``[B, H, W, features]`` to ``[B, H/strides, W/strides, features]`` (BoTNet's and
  SASA's attention, :class:`~hybrid_attn.models.layers.attention.StridedAttention`).
* :meth:`ResNet.pre_block`: an optional ``(name, factory)`` of a module inserted before a
  block; the base class inserts the non-local block (``nonlocal``) before the last block of
  each of ``non_local_stages`` (Wang et al. 2018's single-block placement).

``stage_index`` counts from 0 (``stage_sizes[0]``, the paper's c2, parameters ``stage1``)
and ``block_index`` from 0 within the stage. Parameter names are ``stem``,
``stage1``..``stage4`` / ``block0``.. / ``conv1``, ``bn1``, ``conv2`` (or ``spatial``),
``bn2``, ``conv3``, ``bn3``, ``se``, ``shortcut_conv``, ``shortcut_bn``, and ``head``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.conv import Conv
from hybrid_attn.models.layers.non_local import NonLocalBlock
from hybrid_attn.models.layers.norm import batch_norm
from hybrid_attn.models.layers.pooling import max_pool3
from hybrid_attn.models.layers.regularization import DropPath, drop_path_rates
from hybrid_attn.models.layers.scan import remat_block, same_factory, same_rate, scanned_blocks
from hybrid_attn.models.layers.squeeze_excite import SqueezeExcite

Dtype = Any
Activation = Callable[[jax.Array], jax.Array]
SpatialFactory = Callable[..., nn.Module]
StemFactory = Callable[..., nn.Module]


def conv(
    features: int, kernel: int, strides: int = 1, *, name: str, dtype: Dtype,
    param_dtype: Dtype, groups: int = 1,
) -> Conv:
    """A bias-free square conv padded by ``kernel // 2`` on every side (``groups`` channel
    groups: grouped convolution as in ResNeXt).

    Symmetric padding (PyTorch's) rather than "SAME": for stride 2 on an even input SAME
    pads (k//2 - 1, k//2), which shifts every output pixel relative to published weights.
    :class:`Conv` has nn.Conv's variables and computes 1x1 convolutions as matrix products
    on CPU (layers/conv.py).
    """
    return Conv(
        features, (kernel, kernel), (strides, strides), padding=[(kernel // 2, kernel // 2)] * 2,
        use_bias=False, feature_group_count=groups, dtype=dtype, param_dtype=param_dtype,
        name=name, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    )


class ConvStem(nn.Module):
    """The standard ResNet stem: 7x7/2 conv -> BN -> activation -> 3x3/2 max pool (/4)."""

    width: int = 64
    activation: Activation = nn.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(self.width, 7, 2, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = batch_norm(train, self.dtype, self.param_dtype, "bn", written_backward=True)(x)
        x = self.activation(x)
        return max_pool3(x)


class BottleneckBlock(nn.Module):
    """1x1 conv -> BN -> act -> spatial op -> BN -> act -> 1x1 conv (4x) -> BN -> [SE] -> +.

    The last BN's scale starts at zero (Goyal et al. 2017) so every block starts as the
    identity. The shortcut is a strided 1x1 conv + BN whenever the shape changes.

    Attributes:
      features: bottleneck width; the block outputs ``4 * features`` channels unless
        ``out_features`` says otherwise (timm's ByobNet sets the output width per stage).
      strides: 1 or 2, carried by the spatial op.
      spatial: None for the 3x3 conv (``conv2``), else a :data:`SpatialFactory`.
      groups: channel groups of the 3x3 conv (ResNeXt; 1 is a plain conv).
      mid_attention: a factory of a channel-attention module applied after ``bn2`` and its
        activation, at the bottleneck width (timm's ByobNet SE / ECA placement); it names
        the module itself (``functools.partial(SqueezeExcite, ..., name="se")``).
      se_ratio: squeeze-excitation after the last BN with ``se_ratio * 4 * features``
        hidden units and a ReLU inside, as in SE-ResNet and ResNet-RS (0 disables).
      activation: the block's nonlinearity (ReLU; SiLU in BoTNet-S1).
      drop_path_rate: stochastic depth on the residual branch.
    """

    features: int
    strides: int = 1
    spatial: SpatialFactory | None = None
    se_ratio: float = 0.0
    activation: Activation = nn.relu
    drop_path_rate: float = 0.0
    out_features: int | None = None
    groups: int = 1
    mid_attention: Callable[[], nn.Module] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = functools.partial(batch_norm, train, self.dtype, self.param_dtype,
                               written_backward=True)
        out_features = self.out_features or 4 * self.features
        y = conv(self.features, 1, name="conv1", **dt)(x)
        y = self.activation(bn("bn1")(y))
        if self.spatial is None:
            y = conv(self.features, 3, self.strides, name="conv2", groups=self.groups, **dt)(y)
        else:
            y = self.spatial(features=self.features, strides=self.strides, name="spatial")(
                y, train=train)
        y = self.activation(bn("bn2")(y))
        if self.mid_attention is not None:
            y = self.mid_attention()(y)
        y = conv(out_features, 1, name="conv3", **dt)(y)
        y = bn("bn3", scale_init=nn.initializers.zeros)(y)
        if self.se_ratio > 0:
            y = SqueezeExcite(max(1, int(out_features * self.se_ratio)), nn.relu,
                              name="se", **dt)(y)
        y = DropPath(self.drop_path_rate)(y, train=train)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, self.strides, name="shortcut_conv", **dt)(x)
            x = bn("shortcut_bn")(x)
        return self.activation(x + y)


class ResNetStage(nn.Module):
    """One stage (c2..c5): one bottleneck per entry of ``spatial``, the first strided, each
    preceded by its entry of ``pre_blocks`` (``(name, factory)`` or None)."""

    spatial: Sequence[SpatialFactory | None]
    features: int
    strides: int
    pre_blocks: Sequence[tuple[str, Callable[..., nn.Module]] | None] = ()
    se_ratio: float = 0.0
    se_in_spatial_blocks: bool = True
    activation: Activation = nn.relu
    drop_path_rates: Sequence[float] = ()
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block = remat_block(BottleneckBlock, self.remat)
        n = len(self.spatial)
        scanned = self.scan_blocks and n > 1
        if scanned:
            self._check_scannable()
        rates = list(self.drop_path_rates) or [0.0] * n

        def args(i: int, factory: SpatialFactory | None, rate: float) -> tuple:
            """BottleneckBlock's positional arguments for block ``i``."""
            se = self.se_ratio if factory is None or self.se_in_spatial_blocks else 0.0
            return (self.features, self.strides if i == 0 else 1, factory, se,
                    self.activation, rate)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, factory in enumerate(self.spatial):
            if scanned and i == 1:
                rate = same_rate(rates[1:], f"ResNet {self.name}")
                make = functools.partial(BottleneckBlock, *args(1, factory, rate), **kw)
                return scanned_blocks(make, n - 1, train=train, remat=self.remat)(x)
            if self.pre_blocks and self.pre_blocks[i] is not None:
                name, pre = self.pre_blocks[i]
                x = pre(name=name)(x, train=train)
            x = block(*args(i, factory, rates[i]), **kw, name=f"block{i}")(x, train=train)
        return x

    def _check_scannable(self) -> None:
        """Blocks 1 .. n-1 must be one module: same spatial factory, no inserted block."""
        rest = self.spatial[1:]
        if not all(same_factory(f, rest[0]) for f in rest):
            raise ValueError(f"ResNet {self.name}: scan_blocks needs the same spatial op in "
                             f"blocks 1..{len(self.spatial) - 1}, got {tuple(rest)}; "
                             "use scan_blocks=False")
        pre = [i for i, p in enumerate(self.pre_blocks) if p is not None and i > 0]
        if pre:
            raise ValueError(f"ResNet {self.name}: scan_blocks cannot scan blocks with a "
                             f"module inserted before them (blocks {pre}, e.g. non_local_stages)"
                             "; use scan_blocks=False")


class ResNet(nn.Module):
    """A bottleneck ResNet; subclasses swap the stem, spatial ops or inserted blocks by
    overriding :meth:`stem_factory`, :meth:`block_spatial` and :meth:`pre_block`.

    Attributes:
      stage_sizes: blocks per stage (c2..c5), e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      num_classes: classifier width; 0 returns the pooled features instead of logits.
      width: bottleneck width of the first stage (doubled per stage).
      stem_width: channels of the conv stem; None for ``width`` (timm's stem is always 64).
      se_ratio: squeeze-excitation ratio of the expanded width (0 disables).
      se_in_spatial_blocks: whether blocks with a replaced spatial op get SE too.
      activation: nonlinearity everywhere (ReLU; SiLU for BoTNet-S1).
      last_stride: stride of the last stage (2; 1 for BoTNet-S1's unstrided c5).
      non_local_stages: stage indices that get a non-local block before their last block.
      drop_path_rate: stochastic depth rising linearly to this over all blocks.
      remat: "none" or "block" (each bottleneck under ``nn.remat``; same parameters).
      scan_blocks: run blocks ``1 .. n-1`` of every stage with more than one block through
        one ``nn.scan`` (layers/scan.py: parameters ``stageK/block0`` and
        ``stageK/blocks/block`` with a leading axis of ``n - 1``; move a checkpoint with
        ``stack_blocks``/``unstack_blocks``). The scanned blocks must be identical: same
        spatial factory (compared with :func:`~hybrid_attn.models.layers.scan.same_factory`,
        so subclasses such as BoTNet and SASA scan too), one drop-path rate (use
        ``drop_path_rate=0``), and no inserted ``pre_block``; a stage that breaks this
        (``non_local_stages``) raises a ValueError naming the stage rather than scanning
        part of it.
    """

    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width: int = 64
    stem_width: int | None = None
    se_ratio: float = 0.0
    se_in_spatial_blocks: bool = True
    activation: Activation = nn.relu
    last_stride: int = 2
    non_local_stages: Sequence[int] = ()
    drop_path_rate: float = 0.0
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images, got shape {x.shape}")
        x = x.astype(self.dtype)
        x = self.stem_factory()(name="stem")(x, train=train)
        rates = drop_path_rates(self.drop_path_rate, list(self.stage_sizes))
        last = len(self.stage_sizes) - 1
        for s, n in enumerate(self.stage_sizes):
            x = ResNetStage(
                tuple(self.block_spatial(s, i) for i in range(n)), self.width * 2**s,
                1 if s == 0 else (self.last_stride if s == last else 2),
                tuple(self.pre_block(s, i) for i in range(n)), self.se_ratio,
                self.se_in_spatial_blocks, self.activation, rates[s], self.remat,
                dtype=self.dtype, param_dtype=self.param_dtype, scan_blocks=self.scan_blocks,
                name=f"stage{s + 1}",
            )(x, train=train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head")(x.astype(self.dtype))
        return x.astype(jnp.float32)

    def stem_factory(self) -> StemFactory:
        """The stem: :class:`ConvStem` of ``width`` channels (SASA overrides it)."""
        return functools.partial(ConvStem, self.stem_width or self.width, self.activation,
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def block_spatial(self, stage_index: int, block_index: int) -> SpatialFactory | None:
        """The spatial op of one block: None, the 3x3 conv (BoTNet and SASA override it)."""
        return None

    def pre_block(
        self, stage_index: int, block_index: int
    ) -> tuple[str, Callable[..., nn.Module]] | None:
        """A ``(name, factory)`` inserted before the block: the non-local block before the
        last block of each of ``non_local_stages``, else None."""
        if stage_index in self.non_local_stages and block_index == (
                self.stage_sizes[stage_index] - 1):
            return "nonlocal", functools.partial(NonLocalBlock, dtype=self.dtype,
                                                 param_dtype=self.param_dtype)
        return None


resnet26 = functools.partial(ResNet, stage_sizes=(1, 2, 4, 1))
resnet38 = functools.partial(ResNet, stage_sizes=(2, 3, 5, 2))
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
resnet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
resnet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
