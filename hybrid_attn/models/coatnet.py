"""CoAtNet (Dai et al. 2021): convolution stages followed by relative-attention stages.

Layout (Table 3): S0 a two-conv stem, S1 and S2 pre-norm MBConv blocks, S3 and S4
pre-norm transformer blocks with relative attention (Eq. 3), each stage halving the
resolution in its first block; global average pooling and a classifier.

Where the paper is silent the model follows the published code as ported by timm
(``maxxvit.py``, ``coatnet_0_224`` ...), so timm weights load and reproduce its logits:
MBConv expansion and squeeze-excitation sized from the output width, SiLU inside the
squeeze-excitation, a LayerNorm before the classifier. Deliberate deviations from the
paper's text each have a field:
  * ``stride_at="depthwise"``: downsampling MBConv blocks stride their depthwise conv as
    the published code does; ``"expand"`` strides the first 1x1 conv as the paper's
    formula does (Table 3's FLOPs, which the depthwise placement exceeds by 5-10%).
  * ``pre_logits=True``: a tanh Dense layer of the final width before the classifier, as
    in the published code and timm. The paper's parameter counts include it (without it
    CoAtNet-0 has 24.4M parameters instead of 25M).

Parameter counts at 224 (``jax.eval_shape``; paper Table 3 in brackets): CoAtNet-0 25.04M
(25M), -1 42.23M (42M), -2 74.68M (75M), -3 166.97M (168M), -4 275.43M (275M), equal to
timm's. Multiply-adds of convolutions and matrix products at 224 with ``stride_at="expand"``:
4.14G (4.2G), 8.24G (8.4G), 15.50G (15.7G), 34.37G (34.7G); ``"depthwise"`` adds 10%, 5%,
6%, 6%.

Input height and width must be multiples of 32 (five stride-2 stages); the relative bias
tables are sized from the traced input (``hybrid_attn.models.resize_position_tables``
adapts trained tables to a new resolution).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.attention import Attention, PositionFactory
from hybrid_attn.models.layers.dense import Dense
from hybrid_attn.models.layers.layer_scale import LayerScale
from hybrid_attn.models.layers.mbconv import ConvStem, MBConv, StrideAt
from hybrid_attn.models.layers.mlp import Mlp
from hybrid_attn.models.layers.norm import LayerNorm, batch_norm
from hybrid_attn.models.layers.pooling import avg_pool2
from hybrid_attn.models.layers.regularization import DropPath, drop_path_rates
from hybrid_attn.models.layers.relative_bias import RelativeBias2D
from hybrid_attn.models.layers.scan import remat_block, same_rate, scanned_blocks

Dtype = Any
NormKind = Literal["layer", "batch"]
BlockFactory = Callable[..., nn.Module]
REDUCTION = 32  # total stride: the stem and four stages each halve the resolution


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> LayerNorm:
    """LayerNorm with eps 1e-6 (timm's CoAtNet) and two-pass float32 statistics."""
    return LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                     param_dtype=param_dtype, name=name)


def channel_norm(kind: NormKind, train: bool, dtype: Dtype, param_dtype: Dtype,
                 name: str) -> nn.Module:
    """The transformer norm over channels: :func:`layer_norm`, or a BatchNorm with the same
    eps 1e-6 (timm's ``coatnet_bn_0_rw``)."""
    if kind == "layer":
        return layer_norm(dtype, param_dtype, name)
    if kind == "batch":
        return batch_norm(train, dtype, param_dtype, name, epsilon=1e-6)
    raise ValueError(f"norm must be 'layer' or 'batch', got {kind!r}")


def check_input(x: jax.Array, *per_stage: Sequence) -> None:
    """Raises ValueError unless ``x`` is NHWC with sides that are multiples of
    :data:`REDUCTION` and each of ``per_stage`` (depths, widths, ...) has four entries."""
    if x.ndim != 4:
        raise ValueError(f"CoAtNet expects NHWC images, got shape {x.shape}")
    h, w = x.shape[1:3]
    if h % REDUCTION or w % REDUCTION:
        raise ValueError(
            f"CoAtNet needs input height and width that are multiples of {REDUCTION} "
            f"(five stride-2 stages); got {h}x{w}"
        )
    if any(len(field) != 4 for field in per_stage):
        raise ValueError("depths, widths and block_types need one entry per stage S1..S4")


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with relative attention (Dai et al. 2021, Eq. 4-5):

        x <- shortcut(x) + DropPath(Attention(Pool(LN(x))))
        x <- x + DropPath(FFN(LN(x)))

    With ``strides=2`` ``Pool`` is 2x2 average pooling and ``shortcut`` is that pooling
    followed by a Dense projection to ``features``; otherwise both are the identity. The
    attention maps the input width to ``features`` with ``features // head_dim`` heads and
    a :class:`RelativeBias2D` table sized from the (pooled) map.

    The remaining fields are timm's rw variants (:mod:`hybrid_attn.models.coatnet_rw`):
    ``attn_from_input`` makes the attention as wide as the input (the output projection
    widens), ``shortcut_bias`` drops the shortcut's bias, ``norm`` picks LayerNorm or
    BatchNorm (:func:`channel_norm`), ``layer_scale`` scales both branches by a LayerScale
    of that initial value, ``pool`` replaces the 2x2 averaging, ``position`` the bias table.
    """

    features: int
    strides: int = 1
    head_dim: int = 32
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    attn_from_input: bool = False
    shortcut_bias: bool = True
    norm: NormKind = "layer"
    layer_scale: float | None = None
    pool: Callable[[jax.Array], jax.Array] = avg_pool2
    position: PositionFactory = RelativeBias2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(channel_norm, self.norm, train, self.dtype, self.param_dtype)
        scale = lambda y, name: y if self.layer_scale is None else LayerScale(  # noqa: E731
            self.layer_scale, self.param_dtype, name=name)(y)
        width = x.shape[-1] if self.attn_from_input else self.features
        y = norm("norm1")(x)
        if self.strides == 2:
            x, y = self.pool(x), self.pool(y)
        if x.shape[-1] != self.features:
            x = Dense(self.features, use_bias=self.shortcut_bias, name="shortcut", **kw)(x)
        y = Attention(features=width, head_dim=self.head_dim, out_features=self.features,
                      position=self.position, name="attn", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(scale(y, "layer_scale1"), train=train)
        y = Mlp(int(self.features * self.mlp_ratio), name="mlp", **kw)(norm("norm2")(x),
                                                                       train=train)
        return x + DropPath(self.drop_path)(scale(y, "layer_scale2"), train=train)


class Stage(nn.Module):
    """One stage: ``depth`` blocks of one kind ('C' convolution or 'T' transformer), the
    first with stride 2, named ``block0`` ... ; its output is sown as
    ``intermediates/output``. ``blocks`` maps each kind to a factory called as
    ``factory(features, strides, drop_path=rate, name=name)`` (see ``CoAtNet.blocks``).
    ``remat`` and ``scan_blocks``: see :mod:`hybrid_attn.models.layers.scan`."""

    kind: str
    depth: int
    features: int
    drop_path: Sequence[float]
    blocks: Mapping[str, BlockFactory]
    remat: str = "none"
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.kind not in self.blocks:
            raise ValueError(f"Unknown block type {self.kind!r}; use one of {sorted(self.blocks)}")
        block = remat_block(self.blocks[self.kind], self.remat)
        unrolled = 1 if self.scan_blocks and self.depth > 1 else self.depth
        for b in range(unrolled):
            x = block(self.features, 2 if b == 0 else 1, drop_path=self.drop_path[b],
                      name=f"block{b}")(x, train=train)
        if unrolled < self.depth:
            rate = same_rate(self.drop_path[1:], self.name or "Stage")
            make = functools.partial(self.blocks[self.kind], self.features, 1, drop_path=rate)
            x = scanned_blocks(make, self.depth - 1, train=train, remat=self.remat)(x)
        self.sow("intermediates", "output", x)
        return x


class CoAtNet(nn.Module):
    """CoAtNet classifier. Variables: ``params`` and ``batch_stats`` (MBConv BatchNorms).

    Parameter tree: ``stem`` {conv1, norm1, conv2}; ``stage1`` .. ``stage4`` each with
    ``block0`` ...; ``head_norm``, ``pre_logits``, ``head``. Stage outputs (strides 4 .. 32)
    are sown as ``intermediates/stage{i}/output`` (``apply(..., mutable=["intermediates"])``).

    Attributes:
      depths: blocks in S1..S4 (the paper's L1..L4; S0 is always two convs).
      widths: channels of S1..S4 (D1..D4).
      stem_width: channels of S0 (D0).
      block_types: 'C' (MBConv) or 'T' (transformer) per stage; the paper's C-C-T-T.
      head_dim: transformer head dimension (32 in the paper).
      stride_at: where downsampling MBConv blocks stride, see the module docstring.
      pre_logits: tanh Dense layer before the classifier, see the module docstring.
      drop_path_rate: stochastic depth, rising linearly to this rate over S1..S4 blocks.
      dropout: dropout before the classifier.
      remat: "none" or "block" (each block under ``nn.remat``; same parameters).
      scan_blocks: blocks 1..n-1 of every stage through one ``nn.scan`` (stacked
        parameters under ``stage{i}/blocks/block``; see ``layers/scan.py``).
    """

    depths: Sequence[int] = (2, 3, 5, 2)
    widths: Sequence[int] = (96, 192, 384, 768)
    stem_width: int = 64
    block_types: Sequence[str] = ("C", "C", "T", "T")
    head_dim: int = 32
    stride_at: StrideAt = "depthwise"
    pre_logits: bool = True
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def blocks(self) -> dict[str, BlockFactory]:
        """The :class:`Stage` factories of 'C' (MBConv) and 'T' (transformer) blocks."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return {"C": functools.partial(MBConv, stride_at=self.stride_at, **kw),
                "T": functools.partial(TransformerBlock, head_dim=self.head_dim, **kw)}

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_input(x, self.depths, self.widths, self.block_types)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvStem(self.stem_width, name="stem", **kw)(x.astype(self.dtype), train=train)
        rates, blocks = drop_path_rates(self.drop_path_rate, self.depths), self.blocks()
        for s, (depth, width, kind) in enumerate(zip(self.depths, self.widths,
                                                     self.block_types)):
            x = Stage(kind, depth, width, drop_path=tuple(rates[s]), blocks=blocks,
                      remat=self.remat, scan_blocks=self.scan_blocks,
                      name=f"stage{s + 1}")(x, train=train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = layer_norm(self.dtype, self.param_dtype, "head_norm")(x)
        if self.pre_logits:
            x = jnp.tanh(nn.Dense(self.widths[-1], name="pre_logits", **kw)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, name="head", **kw)(x)
        return x.astype(jnp.float32)


# Table 3 of the paper (S1..S4 blocks and widths; S0 width as stem_width).
coatnet_0 = functools.partial(CoAtNet, depths=(2, 3, 5, 2), widths=(96, 192, 384, 768),
                              stem_width=64)
coatnet_1 = functools.partial(CoAtNet, depths=(2, 6, 14, 2), widths=(96, 192, 384, 768),
                              stem_width=64)
coatnet_2 = functools.partial(CoAtNet, depths=(2, 6, 14, 2), widths=(128, 256, 512, 1024),
                              stem_width=128)
coatnet_3 = functools.partial(CoAtNet, depths=(2, 6, 14, 2), widths=(192, 384, 768, 1536),
                              stem_width=192)
coatnet_4 = functools.partial(CoAtNet, depths=(2, 12, 28, 2), widths=(192, 384, 768, 1536),
                              stem_width=192)
