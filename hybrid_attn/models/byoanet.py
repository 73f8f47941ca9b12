"""timm's trained BoTNets and HaloNets (``timm.models.byoanet``, built on its ByobNet).

These are the only trained BoTNets and HaloNets there are, so they are named after their
source (timm's names without the resolution suffix) and built as timm builds them. Each
block is the house :class:`~hybrid_attn.models.resnet.BottleneckBlock` (conv1 -> 3x3 conv
or attention -> conv3, widths per stage); stages list their blocks one by one because
timm places attention per block, not per stage.

How they differ from the papers they take their attention from:

* **Backbone** (all): not the papers' ResNet-50 / HaloNet-H0..H7 but timm's "ResNet-T"
  family: a tiered stem of three 3x3 convs (24, 32, 64 channels, the first strided; then a
  3x3/2 max pool, or, in the ``33ts`` / ``halo2botnet50ts`` models, a strided third conv
  instead), stage widths 256-512-1024-2048 (1536 with bottleneck ratio 1/3 in the last
  stage of the ``33ts`` models) and every shortcut a strided 1x1 conv + BN.
  "26t" is 2-2-2-2 blocks, "33ts" 2-3-3-2, "50ts" 3-4-6-3; "s" means SiLU instead of ReLU.
* **Attention placement**: in the last two (or three) stages only, interleaved with
  convolutional blocks (e.g. every other block), not the papers' full c5 (BoTNet) or every
  stage (HaloNet).
* **BoTNet attention** (Srinivas et al. 2021): timm's ``BottleneckAttn``, 4 heads, q/k/v
  without bias, 2-D relative logits from the *unscaled* query (the authors scale it),
  2x2 average pooling after a strided block; fixed-size tables, so these models run at
  their trained 256 x 256 (``hybrid_attn.models.resize_position_tables`` resamples them).
* **HaloNet attention** (Vaswani et al. 2021): timm's ``HaloAttn`` (see
  :mod:`~hybrid_attn.models.layers.halo_attention`): 8 heads, block 8, halo 2 (26t) or 3,
  zero-padded keys, strided query blocks for downsampling; any input whose attention maps
  are multiples of 8: sides multiples of 256 (the last stage attends at 1/32), of 128 for
  ``halo2botnet50ts`` (halo attention ends at 1/16).
* **Channel attention**: SE (1/16 of the bottleneck width, rounded to a multiple of 8,
  ReLU inside) or ECA, after the 3x3 conv of the convolutional blocks only.
* ``eca_*next*``: ResNeXt-style grouped 3x3 convs of 16 channels per group, SiLU, and
  16-wide query/key heads (values stay ``width / heads`` wide).
* ``*33ts``: a final 1x1 conv + BN + SiLU to 1280 channels before pooling.
* ``halo2botnet50ts``: halo attention (block 8, halo 3) in stages 2 and 3, BoT attention
  in stage 4.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.botnet import BoTAttention
from hybrid_attn.models.layers.eca import EfficientChannelAttention
from hybrid_attn.models.layers.halo_attention import HaloBottleneckAttention
from hybrid_attn.models.layers.norm import batch_norm
from hybrid_attn.models.layers.pooling import max_pool3
from hybrid_attn.models.layers.regularization import drop_path_rates
from hybrid_attn.models.layers.squeeze_excite import SqueezeExcite
from hybrid_attn.models.resnet import BottleneckBlock, SpatialFactory, conv

Dtype = Any
Activation = Callable[[jax.Array], jax.Array]
CHANNEL_ATTENTION = ("se", "eca")


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: the nearest multiple of ``divisor`` (at least ``divisor``),
    one more if that loses more than ``1 - round_limit`` of ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < round_limit * v else out


@dataclasses.dataclass(frozen=True)
class SelfAttn:
    """The self-attention of one block (timm's ``self_attn_layer`` and its kwargs).

    Attributes:
      kind: "bottleneck" (BoTNet's global attention) or "halo" (HaloNet's).
      num_heads: attention heads.
      qk_head_dim: query/key width per head (timm's ``dim_head``); None: the value width.
      block, halo: HaloNet's block and halo sides (unused by "bottleneck").
    """

    kind: str
    num_heads: int
    qk_head_dim: int | None = None
    block: int = 8
    halo: int = 3


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: output ``width``, the first block's ``strides``, and per block its
    self-attention or None (a 3x3 conv bottleneck), bottleneck ratio and group size (0:
    plain convs)."""

    width: int
    strides: int
    blocks: tuple[SelfAttn | None, ...]
    bottle_ratio: float = 0.25
    group_size: int = 0


class TieredStem(nn.Module):
    """timm's tiered stem: 3x3/2 conv (3/8 of ``width``) -> 3x3 (1/2) -> 3x3 (``width``),
    each + BN + activation (``conv1..3``, ``bn1..3``), then a 3x3/2 max pool, or with
    ``pool=False`` a strided third conv; the output is at 1/4 of the input."""

    width: int = 64
    pool: bool = True
    activation: Activation = nn.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        widths = (3 * self.width // 8, self.width // 2, self.width)
        for i, (w, s) in enumerate(zip(widths, (2, 1, 1 if self.pool else 2)), 1):
            x = conv(w, 3, s, name=f"conv{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
            x = self.activation(batch_norm(train, self.dtype, self.param_dtype, f"bn{i}")(x))
        return max_pool3(x) if self.pool else x


class ByoaNet(nn.Module):
    """timm's ByobNet as configured by ``byoanet.py``: tiered stem, stages of bottleneck
    blocks with per-block attention, optional final 1x1 conv, average pool, classifier.

    Attributes:
      stages: the :class:`Stage` list (parameters ``stage1``.. / ``block0``..).
      num_classes: classifier width (``head``); 0 returns the pooled features.
      stem_width: output width of :class:`TieredStem` (``stem``).
      stem_pool: max pool after the stem (else its third conv strides).
      activation: nonlinearity everywhere (ReLU or SiLU).
      channel_attention: None, "se" or "eca" after the 3x3 conv of convolutional blocks
        (``channel_attn``).
      num_features: width of the final 1x1 conv + BN + activation (``final_conv``,
        ``final_bn``); 0 for none.
      drop_path_rate: stochastic depth rising linearly to this over all blocks.
    """

    stages: Sequence[Stage]
    num_classes: int = 1000
    stem_width: int = 64
    stem_pool: bool = True
    activation: Activation = nn.relu
    drop_path_rate: float = 0.0
    channel_attention: str | None = None
    num_features: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ByoaNet expects NHWC images, got shape {x.shape}")
        if self.channel_attention not in (None, *CHANNEL_ATTENTION):
            raise ValueError(f"channel_attention must be None or one of {CHANNEL_ATTENTION}, "
                             f"got {self.channel_attention!r}")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = TieredStem(self.stem_width, self.stem_pool, self.activation, name="stem", **dt)(
            x.astype(self.dtype), train=train)
        rates = drop_path_rates(self.drop_path_rate, [len(s.blocks) for s in self.stages])
        for s, stage in enumerate(self.stages):
            x = ByoaStage(stage, self.activation, self.channel_attention, tuple(rates[s]),
                          name=f"stage{s + 1}", **dt)(x, train=train)
        if self.num_features:
            x = conv(self.num_features, 1, name="final_conv", **dt)(x)
            x = self.activation(batch_norm(train, self.dtype, self.param_dtype, "final_bn")(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        return nn.Dense(self.num_classes, name="head", **dt)(x.astype(self.dtype)).astype(
            jnp.float32)


class ByoaStage(nn.Module):
    """One :class:`Stage` of :class:`BottleneckBlock` s (``block0``..), the first strided."""

    stage: Stage
    activation: Activation = nn.relu
    channel_attention: str | None = None
    drop_path_rates: Sequence[float] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        stage, dt = self.stage, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mid = make_divisible(stage.width * stage.bottle_ratio)
        for i, attn in enumerate(stage.blocks):
            x = BottleneckBlock(
                mid, stage.strides if i == 0 else 1, self._spatial(attn),
                activation=self.activation, drop_path_rate=self.drop_path_rates[i],
                out_features=stage.width, groups=mid // stage.group_size if stage.group_size
                else 1, mid_attention=None if attn else self._channel_attention(mid),
                name=f"block{i}", **dt,
            )(x, train=train)
        return x

    def _spatial(self, attn: SelfAttn | None) -> SpatialFactory | None:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if attn is None:
            return None
        if attn.kind == "bottleneck":
            return functools.partial(BoTAttention, num_heads=attn.num_heads,
                                     scale_position_query=False, qk_head_dim=attn.qk_head_dim,
                                     **dt)
        if attn.kind == "halo":
            return functools.partial(HaloBottleneckAttention, num_heads=attn.num_heads,
                                     qk_head_dim=attn.qk_head_dim, block_size=attn.block,
                                     halo_size=attn.halo, **dt)
        raise ValueError(f"SelfAttn kind must be 'bottleneck' or 'halo', got {attn.kind!r}")

    def _channel_attention(self, width: int) -> Callable[[], nn.Module] | None:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="channel_attn")
        if self.channel_attention == "se":
            return functools.partial(SqueezeExcite, make_divisible(width / 16, round_limit=0.0),
                                     nn.relu, **dt)
        if self.channel_attention == "eca":
            return functools.partial(EfficientChannelAttention, **dt)
        return None


def _stages(widths: Sequence[int], blocks: Sequence[Sequence[SelfAttn | None]],
            last_ratio: float = 0.25, group_size: int = 0) -> tuple[Stage, ...]:
    """Stages of ``widths`` with ``blocks``; the first unstrided, the others strided."""
    return tuple(
        Stage(w, 1 if i == 0 else 2, tuple(b), last_ratio if i == len(widths) - 1 else 0.25,
              group_size)
        for i, (w, b) in enumerate(zip(widths, blocks))
    )


C = None  # a 3x3 conv bottleneck
_WIDTHS = (256, 512, 1024, 2048)
_WIDTHS_33 = (256, 512, 1024, 1536)


def _layout26(a: SelfAttn) -> tuple[tuple[SelfAttn | None, ...], ...]:
    return (C, C), (C, C), (C, a), (a, a)


def _layout33(a: SelfAttn) -> tuple[tuple[SelfAttn | None, ...], ...]:
    return (C, C), (C, C, a), (C, C, a), (a, a)


_BOT = SelfAttn("bottleneck", 4)
_BOT16 = SelfAttn("bottleneck", 4, qk_head_dim=16)
_HALO2, _HALO3 = SelfAttn("halo", 8, halo=2), SelfAttn("halo", 8, halo=3)
_HALO2_16 = SelfAttn("halo", 8, qk_head_dim=16, halo=2)
_HALO3_H4 = SelfAttn("halo", 4, halo=3)
_SE33 = dict(stem_pool=False, activation=nn.silu, channel_attention="se", num_features=1280)

botnet26t = functools.partial(ByoaNet, stages=_stages(_WIDTHS, _layout26(_BOT)))
sebotnet33ts = functools.partial(
    ByoaNet, stages=_stages(_WIDTHS_33, _layout33(_BOT), last_ratio=0.333), **_SE33)
eca_botnext26ts = functools.partial(
    ByoaNet, stages=_stages(_WIDTHS, _layout26(_BOT16), group_size=16), activation=nn.silu,
    channel_attention="eca")
halonet26t = functools.partial(ByoaNet, stages=_stages(_WIDTHS, _layout26(_HALO2)))
sehalonet33ts = functools.partial(
    ByoaNet, stages=_stages(_WIDTHS_33, _layout33(_HALO3), last_ratio=0.333), **_SE33)
halonet50ts = functools.partial(
    ByoaNet, activation=nn.silu, stages=_stages(_WIDTHS, (
        (C,) * 3, (C, C, C, _HALO3_H4), (C, _HALO3) * 3, (C, _HALO3, C))))
eca_halonext26ts = functools.partial(
    ByoaNet, stages=_stages(_WIDTHS, _layout26(_HALO2_16), group_size=16), activation=nn.silu,
    channel_attention="eca")
halo2botnet50ts = functools.partial(
    ByoaNet, stem_pool=False, activation=nn.silu, stages=_stages(_WIDTHS, (
        (C,) * 3, (C, _HALO3) * 2, (C, _HALO3) * 3, (C, _BOT, C))))
