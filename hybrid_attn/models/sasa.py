"""Stand-alone self-attention ResNets (Ramachandran et al. 2019, "SASA").

A bottleneck ResNet (:mod:`hybrid_attn.models.resnet`) in which every spatial convolution
becomes local self-attention (:class:`~hybrid_attn.models.layers.local_attention.
LocalSelfAttention`: 7x7 neighbourhoods, 8 heads, row/column relative embeddings, bias-free
q/k/v 1x1 projections, no output projection); a stride-2 convolution becomes attention
followed by 2x2 average pooling. The full-attention models also replace the 7x7 conv stem
by the spatially-aware attention stem (:class:`~hybrid_attn.models.layers.attention_stem.
AttentionStem`); the ``_convstem`` variants keep the convolutional stem. Parameter names
are the ResNet's (``stem``, ``stage1``/``block0``/``spatial``/``attn``, ``head``...).

Parameters (any resolution; Table 1 of the paper: 10.3M / 14.1M / 18.0M for both stems):

    model            conv stem (_convstem)   attention stem
    sasa_resnet26    10,331,264              10,323,200
    sasa_resnet38    14,173,384              14,165,320
    sasa_resnet50    18,015,504              18,007,440

Each is the ResNet baseline (13.70M / 19.63M / 25.56M, Table 1: 13.7 / 19.6 / 25.6)
minus ``6 w^2`` per block (a 3x3 conv's ``9 w^2`` becomes q/k/v's ``3 w^2``) plus the
``7 w / 8`` relative-table entries; the attention stem has 8,064 fewer parameters than the
conv stem. 26 and 50 round to the paper's values; ResNet-38 lands at 14.17M where the paper
prints 14.1M: the same 5.45M saving on our 19.63M baseline, while the paper's baseline,
printed as 19.6M, may be up to 0.08M smaller (19.55 - 5.45 = 14.10).

The relative tables depend only on the window size, never on the resolution, so
fine-tuning at another resolution needs no table resizing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from hybrid_attn.models.layers.attention import Attention, StridedAttention
from hybrid_attn.models.layers.attention_stem import AttentionStem
from hybrid_attn.models.layers.local_attention import LocalSelfAttention
from hybrid_attn.models.resnet import ResNet, SpatialFactory, StemFactory


class AttentionSpatial(StridedAttention):
    """The spatial op of a SASA bottleneck: local self-attention (``attn``, Eq. 3), then 2x2
    average pooling where the convolution it replaces was strided (``strides=2``), in ceil
    mode so odd maps match the strided 1x1 shortcut convolution."""

    num_heads: int = 8
    kernel_size: int = 7
    block_size: int = 4
    row_chunk: int | None = 1
    batch_chunk: int | None = 4

    def attention(self) -> Attention:
        return LocalSelfAttention(self.features, self.num_heads, self.kernel_size,
                                  self.block_size, self.row_chunk, self.batch_chunk,
                                  dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="attn")


class SASAResNet(ResNet):
    """A :class:`ResNet` whose spatial convolutions (and optionally stem) are self-attention.

    Attributes (beyond ResNet's; ``stage_sizes`` 26 = (1, 2, 4, 1), 38 = (2, 3, 5, 2),
    50 = (3, 4, 6, 3), Table 1):
      attention_stem: the spatially-aware attention stem instead of the 7x7 conv stem.
      attention_stages: stages (0-based, c2 = 0) whose convolutions become attention;
        the paper's Table 4 ablation varies this, the models use all four.
      num_heads / kernel_size: the attention layers' heads (8) and spatial extent (7).
      block_size / row_chunk / batch_chunk: memory/speed knobs of the block-wise
        attention; they never change the result (see
        :mod:`~hybrid_attn.models.layers.local_attention`).
      stem_heads: heads of the attention stem (4).
    """

    attention_stem: bool = True
    attention_stages: Sequence[int] = (0, 1, 2, 3)
    num_heads: int = 8
    kernel_size: int = 7
    block_size: int = 4
    row_chunk: int | None = 1
    batch_chunk: int | None = 4
    stem_heads: int = 4

    def stem_factory(self) -> StemFactory:
        """The attention stem (``width`` channels), or ResNet's conv stem."""
        if not self.attention_stem:
            return super().stem_factory()
        return functools.partial(AttentionStem, features=self.width, num_heads=self.stem_heads,
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def block_spatial(self, stage_index: int, block_index: int) -> SpatialFactory | None:
        """Local self-attention in the attention stages, else ResNet's choice."""
        if stage_index not in self.attention_stages:
            return super().block_spatial(stage_index, block_index)
        return functools.partial(
            AttentionSpatial, num_heads=self.num_heads, kernel_size=self.kernel_size,
            block_size=self.block_size, row_chunk=self.row_chunk,
            batch_chunk=self.batch_chunk, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


sasa_resnet26 = functools.partial(SASAResNet, stage_sizes=(1, 2, 4, 1))
sasa_resnet38 = functools.partial(SASAResNet, stage_sizes=(2, 3, 5, 2))
sasa_resnet50 = functools.partial(SASAResNet, stage_sizes=(3, 4, 6, 3))
sasa_resnet26_convstem = functools.partial(sasa_resnet26, attention_stem=False)
sasa_resnet38_convstem = functools.partial(sasa_resnet38, attention_stem=False)
sasa_resnet50_convstem = functools.partial(sasa_resnet50, attention_stem=False)
