"""Bottleneck Transformers (BoTNet; Srinivas et al. 2021).

A BoTNet is a ResNet whose bottleneck 3x3 convolutions in the attention stages are
replaced by global multi-head self-attention (the MHSA layer of the paper's Fig. 4):
4 heads, q/k/v 1x1 projections without bias, no output projection, 2-D relative position
logits, and a 2x2 average pool after the attention where the block strides. BatchNorm +
activation follow as in the ResNet block.

* ``botnet50``: ResNet-50 with all three c5 blocks as BoT blocks; the paper's 20.8M
  parameters (ours: 20,852,008 at 224: the first c5 block attends on the 14x14 c4 map
  before pooling, the other two on 7x7). ``attention_stages=(2, 3)`` also replaces c4
  (the paper's c4+c5 ablation); ``position="absolute"|"none"`` gives its position
  encoding ablation; ``non_local_stages`` inserts the non-local baseline blocks.
* ``botnet_s1_t3`` .. ``botnet_s1_t7``: the BoTNet-S1 classification family (the
  T-table): c5 not strided (attention at 1/16 of the input), squeeze-excitation (1/16 of
  the expanded width, after the last BN) in the convolutional blocks, SiLU. The paper's
  counts (33.5/54.7/75.1/53.9/75.1M) include SE in the attention blocks too although the
  text puts SE only in the convolutional ones. We build the text's models
  (``se_in_spatial_blocks=False``): 30.5/51.7/69.1/47.9/69.2M at their resolutions
  224/224/256/320/384; ``se_in_spatial_blocks=True`` gives the table's variant
  (33.7/54.9/75.4/54.2/75.5M, within 0.7% of the table). tests/test_botnet.py pins both.

The relative tables are sized from the traced feature map; another input size raises a
ValueError naming both sizes, and ``hybrid_attn.models.resize_position_tables`` resamples
a trained model's tables for fine-tuning at a new resolution (e.g. 224 -> 384).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn

from hybrid_attn.models.layers.attention import Attention, StridedAttention
from hybrid_attn.models.layers.relative_logits import POSITION_KINDS, position_term
from hybrid_attn.models.resnet import ResNet, SpatialFactory


class BoTAttention(StridedAttention):
    """The BoT block's spatial op: MHSA over the whole map (``attn``), then 2x2 avg pool if
    strided (even maps only, like timm's pooling).

    Attributes:
      features: q/k/v = output width (the bottleneck width); ``head_dim = features /
        num_heads``.
      strides: 1, or 2 for attention followed by 2x2 average pooling.
      num_heads: 4 in the paper.
      position: "relative" (2-D relative logits), "absolute" or "none" (the ablation).
      scale_position_query: whether the position term sees ``q / sqrt(d)`` (the
        authors' code) rather than the unscaled ``q`` (timm's default).
      qk_head_dim: query/key width per head if not ``features / num_heads`` (timm's
        ``dim_head=16`` in ``eca_botnext26ts_256``).
    """

    num_heads: int = 4
    position: str = "relative"
    scale_position_query: bool = True
    qk_head_dim: int | None = None
    even_maps_only: ClassVar[bool] = True

    def attention(self) -> Attention:
        return Attention(
            features=self.features, num_heads=self.num_heads, qk_head_dim=self.qk_head_dim,
            qkv_bias=False, dtype=self.dtype,
            position=position_term(self.position, scale_query=self.scale_position_query),
            param_dtype=self.param_dtype, name="attn",
        )


class BoTNet(ResNet):
    """A :class:`ResNet` whose blocks in ``attention_stages`` are BoT blocks.

    Attributes (beyond ResNet's):
      attention_stages: stage indices (0 = c2 .. 3 = c5) made of BoT blocks; ``(3,)`` is
        BoTNet-50, ``(2, 3)`` the c4+c5 ablation.
      num_heads, position, scale_position_query: see :class:`BoTAttention`.
    """

    attention_stages: Sequence[int] = (3,)
    num_heads: int = 4
    position: str = "relative"
    scale_position_query: bool = True

    def block_spatial(self, stage_index: int, block_index: int) -> SpatialFactory | None:
        """BoT attention in the attention stages, else ResNet's choice (the 3x3 conv)."""
        if self.position not in POSITION_KINDS:
            raise ValueError(f"Unknown position {self.position!r}; valid: {POSITION_KINDS}")
        if stage_index in self.attention_stages:
            return functools.partial(
                BoTAttention, num_heads=self.num_heads, position=self.position,
                scale_position_query=self.scale_position_query, dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        return super().block_spatial(stage_index, block_index)


_S1 = dict(last_stride=1, activation=nn.silu, se_ratio=1 / 16, se_in_spatial_blocks=False)

botnet50 = functools.partial(BoTNet, stage_sizes=(3, 4, 6, 3))
botnet_s1_t3 = functools.partial(BoTNet, stage_sizes=(3, 4, 6, 6), **_S1)
botnet_s1_t4 = functools.partial(BoTNet, stage_sizes=(3, 4, 23, 6), **_S1)
botnet_s1_t5 = functools.partial(BoTNet, stage_sizes=(3, 4, 23, 12), **_S1)
botnet_s1_t6 = functools.partial(BoTNet, stage_sizes=(3, 4, 6, 12), **_S1)
botnet_s1_t7 = functools.partial(BoTNet, stage_sizes=(3, 4, 23, 12), **_S1)

# The T-family's training / evaluation resolutions (the paper's T-table).
S1_RESOLUTIONS = {"botnet_s1_t3": 224, "botnet_s1_t4": 224, "botnet_s1_t5": 256,
                  "botnet_s1_t6": 320, "botnet_s1_t7": 384}
