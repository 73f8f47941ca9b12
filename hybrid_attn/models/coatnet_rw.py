"""timm's "rw" CoAtNets (``maxxvit.py``, Ross Wightman 2022): CoAtNet's C-C-T-T layout as
trained by timm before the official code was public; the only trained CoAtNets there are.

Ours ``coatnet_0_rw`` ... are timm's ``coatnet_0_rw_224`` ... (hybrid_attn/convert/names.py), with
timm's logits for timm's weights. What they change from the paper (Dai et al. 2021) and
from our paper-faithful :mod:`hybrid_attn.models.coatnet`:

* **Stem**: two 3x3 convs of different widths (``stem_widths``, e.g. 32 then 64; the paper
  has one width) with BatchNorm + SiLU between them.
* **MBConv**: SiLU instead of GELU; expansion (4x) and squeeze-excitation width (a quarter
  of the expanded width) from the block *input*, not its output; no bias on the projection
  and shortcut convs (except the ``nano`` models: ``conv_bias``); the pre-norm BatchNorm is
  followed by a SiLU (``pre_norm_act``; not in the ``nano`` models). Squeeze-excitation uses
  ReLU (``0``, ``1``, ``bn_0``, ``rmlp_1``, ``rmlp_1_rw2``) or SiLU (``2``, ``3``,
  ``rmlp_2``, ``nano``), and sits either between the depthwise conv and its BatchNorm
  (``se_early``: ``0``, ``1``, ``bn_0``, ``rmlp_1``) or after it.
* **Downsampling**: the strided MBConv pools 2x2 after its pre-norm (``stride_at="pool"``:
  ``0``, ``nano``, ``rmlp_1``) or strides its depthwise conv (the rest); ``rmlp_1`` pools
  shortcuts and attention inputs with a 3x3 stride-2 max pool instead of 2x2 averaging.
* **Transformer**: the attention is as wide as its *input* (the paper's heads come from the
  output width) and its output projection widens; the strided block's shortcut conv has no
  bias in ``0``, ``1``, ``bn_0``, ``rmlp_1``; ``3`` and ``rmlp_2`` scale both residual
  branches by a LayerScale (Touvron et al. 2021); ``bn_0`` uses BatchNorm (eps 1e-6) in
  place of every transformer LayerNorm.
* **Relative position**: the ``rmlp`` models generate the bias from log-spaced offsets with
  an MLP (:class:`~hybrid_attn.models.layers.relative_mlp.RelativeMlp`) instead of a table.
* **Head**: a norm over channels at every position of the last map (LayerNorm, BatchNorm in
  ``bn_0``), then average pooling and the classifier; no pre-logits layer.
* **Depths**: ``0`` has 7 S3 blocks (the paper's CoAtNet-0 has 5); ``nano`` models are
  3-4-6-3 with widths 64-128-256-512.
* ``coatnext_nano_rw``: ConvNeXt blocks (:class:`~hybrid_attn.models.layers.convnext.
  ConvNeXtBlock`, LayerScale 1e-5) in S1 and S2, a LayerNorm + GELU stem.

Parameter counts at 224 equal timm's (pinned in tests/test_coatnet_rw.py). As in timm, input
sides must be multiples of 32; relative bias tables are sized from the traced input, and
the MLP bias has no table, so ``coatnet_rmlp_2_rw_384`` is the same network as
``coatnet_rmlp_2_rw`` (timm's name for its 384-pixel weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.coatnet import Stage, TransformerBlock, channel_norm, check_input
from hybrid_attn.models.layers.activation import gelu
from hybrid_attn.models.layers.convnext import ConvNeXtBlock
from hybrid_attn.models.layers.mbconv import ConvStem, MBConv
from hybrid_attn.models.layers.pooling import avg_pool2, max_pool3
from hybrid_attn.models.layers.regularization import drop_path_rates
from hybrid_attn.models.layers.relative_bias import RelativeBias2D
from hybrid_attn.models.layers.relative_mlp import RelativeMlp

Dtype = Any
Pool = Callable[[jax.Array], jax.Array]


class CoAtNetRW(nn.Module):
    """timm rw CoAtNet classifier (see the module docstring for what each field changes).

    Parameter tree: ``stem`` {conv1, norm1, conv2}; ``stage1`` .. ``stage4`` each with
    ``block0`` ...; ``norm``, ``head``. Stage outputs are sown as
    ``intermediates/stage{i}/output``.

    Attributes:
      depths / widths: blocks and channels of S1..S4.
      stem_widths: widths of the stem's two convs.
      conv_block: "mbconv" or "convnext" (``coatnext``) for S1 and S2.
      activation: of the stem and the MBConv blocks (SiLU; GELU for ``coatnext``).
      stride_at: "pool" or "depthwise": how the strided MBConv downsamples.
      pool: downsampling of shortcuts and attention inputs (2x2 average, or 3x3 max).
      pre_norm_act, se_early, se_activation, conv_bias: MBConv options, see the docstring.
      transformer_norm: "layer" or "batch" (``bn_0``), also the final norm.
      shortcut_bias: bias of the strided transformer block's shortcut conv.
      layer_scale: initial LayerScale of the transformer branches; None for none.
      conv_layer_scale: initial LayerScale of the ConvNeXt branches.
      position: "bias" (table) or "mlp" (``rmlp``); rel_pos_dim the MLP's hidden width.
      head_dim: attention head width.
    """

    depths: Sequence[int] = (2, 3, 7, 2)
    widths: Sequence[int] = (96, 192, 384, 768)
    stem_widths: tuple[int, int] = (32, 64)
    conv_block: Literal["mbconv", "convnext"] = "mbconv"
    activation: Callable[[jax.Array], jax.Array] = nn.silu
    stride_at: Literal["pool", "depthwise"] = "pool"
    pool: Pool = avg_pool2
    pre_norm_act: bool = True
    se_early: bool = False
    se_activation: Callable[[jax.Array], jax.Array] = nn.relu
    conv_bias: bool = False
    transformer_norm: Literal["layer", "batch"] = "layer"
    shortcut_bias: bool = True
    layer_scale: float | None = None
    conv_layer_scale: float = 1e-5
    position: Literal["bias", "mlp"] = "bias"
    rel_pos_dim: int = 512
    head_dim: int = 32
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def blocks(self) -> dict[str, Callable[..., nn.Module]]:
        """Factories of the 'C' and 'T' blocks, called as ``f(features, strides, drop_path=,
        name=)`` by :class:`~hybrid_attn.models.coatnet.Stage`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.conv_block == "convnext":
            conv = functools.partial(ConvNeXtBlock, layer_scale=self.conv_layer_scale, **kw)
        else:
            conv = functools.partial(
                MBConv, expand_input=True, stride_at=self.stride_at, shortcut_pool=self.pool,
                pre_norm_act=self.pre_norm_act, se_early=self.se_early,
                se_activation=self.se_activation, output_bias=self.conv_bias,
                activation=self.activation, **kw)
        position = (RelativeBias2D if self.position == "bias" else
                    functools.partial(RelativeMlp, hidden_features=self.rel_pos_dim))
        transformer = functools.partial(
            TransformerBlock, head_dim=self.head_dim, attn_from_input=True,
            shortcut_bias=self.shortcut_bias, norm=self.transformer_norm,
            layer_scale=self.layer_scale, pool=self.pool, position=position, **kw)
        return {"C": conv, "T": transformer}

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_input(x, self.depths, self.widths, ("C", "C", "T", "T"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        convnext = self.conv_block == "convnext"
        x = ConvStem(self.stem_widths[1], hidden_features=self.stem_widths[0],
                     norm="layer" if convnext else "batch", activation=self.activation,
                     name="stem", **kw)(x.astype(self.dtype), train=train)
        rates, blocks = drop_path_rates(self.drop_path_rate, self.depths), self.blocks()
        for s, (depth, width) in enumerate(zip(self.depths, self.widths)):
            x = Stage("C" if s < 2 else "T", depth, width, drop_path=tuple(rates[s]),
                      blocks=blocks, name=f"stage{s + 1}")(x, train=train)
        x = channel_norm(self.transformer_norm, train, self.dtype, self.param_dtype, "norm")(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head", **kw)(x).astype(jnp.float32)


_NANO = dict(depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_widths=(32, 64))
_C0 = dict(depths=(2, 3, 7, 2), widths=(96, 192, 384, 768), stem_widths=(32, 64))
_C1 = dict(depths=(2, 6, 14, 2), widths=(96, 192, 384, 768), stem_widths=(32, 64))
_C2 = dict(depths=(2, 6, 14, 2), widths=(128, 256, 512, 1024), stem_widths=(64, 128))
_C3 = dict(depths=(2, 6, 14, 2), widths=(192, 384, 768, 1536), stem_widths=(96, 192))
# The field defaults are timm's ``_rw_coat_cfg``; the nano models use its ``_rw_max_cfg``.
_MAX = dict(pre_norm_act=False, se_activation=nn.silu, conv_bias=True)
_EARLY_SE = dict(se_early=True, shortcut_bias=False)
_DW = dict(stride_at="depthwise")
_DW_SILU_SE = dict(stride_at="depthwise", se_activation=nn.silu)

coatnet_nano_rw = functools.partial(CoAtNetRW, **_NANO, **_MAX, stride_at="pool")
coatnet_0_rw = functools.partial(CoAtNetRW, **_C0, **_EARLY_SE)
coatnet_1_rw = functools.partial(CoAtNetRW, **_C1, **_EARLY_SE, **_DW)
coatnet_2_rw = functools.partial(CoAtNetRW, **_C2, **_DW_SILU_SE)
coatnet_3_rw = functools.partial(CoAtNetRW, **_C3, **_DW_SILU_SE, layer_scale=1e-6)
coatnet_bn_0_rw = functools.partial(CoAtNetRW, **_C0, **_EARLY_SE, **_DW,
                                    transformer_norm="batch")
coatnet_rmlp_nano_rw = functools.partial(CoAtNetRW, **_NANO, **_MAX, **_DW, position="mlp",
                                         rel_pos_dim=384)
coatnet_rmlp_1_rw = functools.partial(CoAtNetRW, **_C1, **_EARLY_SE, pool=max_pool3,
                                      position="mlp", rel_pos_dim=384)
coatnet_rmlp_1_rw2 = functools.partial(CoAtNetRW, **_C1, **_DW, position="mlp")
coatnet_rmlp_2_rw = functools.partial(CoAtNetRW, **_C2, **_DW_SILU_SE, layer_scale=1e-6,
                                      position="mlp")
coatnet_rmlp_2_rw_384 = coatnet_rmlp_2_rw
coatnext_nano_rw = functools.partial(CoAtNetRW, **_NANO, conv_block="convnext", activation=gelu)
