"""Twins-PCPVT and Twins-SVT (Chu et al. 2021, "Twins: Revisiting the Design of Spatial
Attention in Vision Transformers").

Four stages, each: patch embedding (conv kernel = stride, LayerNorm) -> pre-norm
transformer blocks -> one conditional position encoding (PEG) after the first block.
PCPVT uses global sub-sampled attention (GSA) in every block; SVT alternates
locally-grouped attention (LSA, even blocks) and GSA (odd blocks). Head: LayerNorm ->
global average pool -> linear classifier.

Position information comes only from the PEG's depthwise conv, so the models accept any
input size (non-square included) with no table to resize when the resolution changes
(224 -> 384 fine-tuning loads the 224 weights as they are). Sizes and names follow the
published code (timm ``twins_{pcpvt,svt}_{small,base,large}``); the parameter counts
equal the authors' logs (see ``tests/test_twins.py``).

Both attentions are the shared :class:`~hybrid_attn.models.layers.attention.Attention`
(parameter names follow the published code): GSA (Sec. 3.2) with the :class:`Subsampled`
pattern -- keys/values from a conv of kernel = stride = ``sr_ratio`` (``sr``) and a
LayerNorm (``norm``, eps 1e-5), projections ``q``, ``kv``, ``proj``; ``sr_ratio = 1`` (the
last stage) has no conv and no norm. LSA with the :class:`Blocked` pattern: self-attention
in non-overlapping windows, projections ``qkv``, ``proj``.

One deliberate difference: LSA masks the padded keys of windows that overhang a map not
divisible by the window (a side shorter than the window uses one window of that length:
the same result, less work); ``lsa_mask_padding=False`` restores the published padding,
where the *input tokens* are padded with zeros before the ``qkv`` projection, so padded
keys carry the projection bias and take part in the softmax (Twins' "forward_padding";
needed for weight parity on such sizes). Both agree whenever the maps are divisible by
the window, e.g. at 224x224.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.models.layers.attention import Attention, Blocked, Subsampled
from hybrid_attn.models.layers.mlp import Mlp
from hybrid_attn.models.layers.norm import LayerNorm
from hybrid_attn.models.layers.patch_embed import PatchEmbed
from hybrid_attn.models.layers.position_encoding import PositionEncodingGenerator
from hybrid_attn.models.layers.regularization import DropPath, drop_path_rates
from hybrid_attn.models.layers.scan import check_remat, remat_block, same_rate, scanned_blocks

Dtype = Any


class TwinsBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))`` (Eq. 1).

    Attributes:
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / block width.
      sr_ratio: GSA sub-sampling ratio.
      window_size: None for GSA, else the LSA window side.
      lsa_mask_padding: mask LSA's padded keys (True) or reproduce the published zero-token
        padding (False), see the module docstring.
      drop_path_rate: stochastic depth of both residual branches.
      norm_eps: epsilon of ``norm1``/``norm2`` (1e-6 in the published code).
    """

    num_heads: int
    mlp_ratio: float
    sr_ratio: int = 1
    window_size: int | None = None
    lsa_mask_padding: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        if self.window_size is None:
            pattern = Subsampled(self.sr_ratio)
        else:
            pattern = Blocked(self.window_size,
                              padding="mask" if self.lsa_mask_padding else "zero_tokens")
        attn = Attention(num_heads=self.num_heads, out_features=c, pattern=pattern,
                         name="attn", **kw)
        y = LayerNorm(epsilon=self.norm_eps, name="norm1", **kw)(x)
        x = x + DropPath(self.drop_path_rate, name="drop_path1")(attn(y, train=train), train=train)
        y = LayerNorm(epsilon=self.norm_eps, name="norm2", **kw)(x)
        y = Mlp(int(c * self.mlp_ratio), name="mlp", **kw)(y, train=train)
        return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train=train)


class TwinsPair(nn.Module):
    """SVT's scan body: an LSA block (``local``) then a GSA block (``global``)."""

    local: Callable[..., TwinsBlock]
    glob: Callable[..., TwinsBlock]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = self.local(name="local")(x, train=train)
        return self.glob(name="global")(x, train=train)


PAIR_MEMBERS = ("local", "global")


class TwinsStage(nn.Module):
    """``patch_embed`` -> ``block0`` -> ``peg`` -> ``block1`` ... (one PEG, after block 0).

    Attributes:
      features: stage width.
      depth: number of blocks.
      patch_size: kernel/stride of the patch embedding (4 for stage 1, else 2).
      block: factory of the stage's :class:`TwinsBlock` (heads, MLP ratio, sub-sampling,
        norms), called with ``window_size``, ``drop_path_rate`` and ``name``.
      window_size: None for PCPVT (GSA everywhere); else SVT, where even blocks use LSA with
        this window and odd blocks GSA. A window of 1 means GSA, as in the published code.
      drop_path_rates: one rate per block.
      remat, scan_blocks: see :class:`Twins`.
    """

    features: int
    depth: int
    patch_size: int
    block: Callable[..., TwinsBlock]
    window_size: int | None = None
    drop_path_rates: Sequence[float] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_blocks: bool = False

    def scan_layout(self) -> tuple[int, int, int]:
        """``(start, period, groups)`` of the scanned blocks (groups 0: nothing scanned)."""
        svt = self.window_size not in (None, 1)
        start, period = (2, 2) if svt else (1, 1)
        groups = max(0, (self.depth - start) // period) if self.scan_blocks else 0
        return start, period, groups

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_remat(self.remat)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = list(self.drop_path_rates) or [0.0] * self.depth
        x = PatchEmbed(self.features, self.patch_size, name="patch_embed", **kw)(x)
        block = remat_block(self.block, self.remat)
        start, period, groups = self.scan_layout()
        end = start + groups * period
        for i in range(self.depth):
            if groups and start <= i < end:
                if i == start:
                    rate = same_rate(rates[start:end], f"Twins {self.name}")
                    if period == 1:
                        make = functools.partial(self.block, window_size=None,
                                                 drop_path_rate=rate)
                    else:
                        make = functools.partial(
                            TwinsPair,
                            functools.partial(self.block, window_size=self.window_size,
                                              drop_path_rate=rate),
                            functools.partial(self.block, window_size=None,
                                              drop_path_rate=rate))
                    x = scanned_blocks(make, groups, train=train, remat=self.remat)(x)
                continue
            local = self.window_size not in (None, 1) and i % 2 == 0
            x = block(window_size=self.window_size if local else None,
                      drop_path_rate=rates[i], name=f"block{i}")(x, train=train)
            if i == 0:
                x = PositionEncodingGenerator(name="peg", **kw)(x)
        return x


class Twins(nn.Module):
    """Twins classifier on NHWC images; returns float32 logits ``[B, num_classes]``.

    Attributes:
      embed_dims, num_heads, depths, mlp_ratios, sr_ratios: per-stage sizes (Table 1-2 of
        the paper, values of the published code).
      window_sizes: None for PCPVT; per-stage LSA windows (7) for SVT.
      patch_sizes: patch-embedding strides per stage.
      drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
      lsa_mask_padding: False reproduces the published LSA padding (weight parity on maps
        not divisible by the window).
      norm_eps: epsilon of the block and final LayerNorms (patch-embedding and GSA norms use
        1e-5, as published).
      remat: "none" or "block" (each block under ``nn.remat``; same parameters).
      scan_blocks: compile one block body per stage instead of one per block (layers/
        scan.py). PCPVT: ``block0``, ``peg`` unrolled, blocks ``1 .. n-1`` under
        ``blocks/block`` with a leading axis of ``n - 1`` (``stack_blocks(stage, n)``). SVT:
        ``block0``, ``peg``, ``block1`` unrolled, then pairs (LSA block ``2 + 2g`` ->
        ``blocks/block/local``, GSA block ``3 + 2g`` -> ``blocks/block/global``), an odd last
        block stays ``block{n-1}`` (``stack_blocks(stage, n, start=2, period=2,
        members=PAIR_MEMBERS)``). The scanned blocks need one drop-path rate (use
        ``drop_path_rate=0``). Captured attention maps (``attention`` collection) of the
        scanned blocks are stacked along the leading block (pair) axis, like their
        parameters.
    """

    embed_dims: Sequence[int]
    num_heads: Sequence[int]
    depths: Sequence[int]
    mlp_ratios: Sequence[float]
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    window_sizes: Sequence[int] | None = None
    patch_sizes: Sequence[int] = (4, 2, 2, 2)
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    lsa_mask_padding: bool = True
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_blocks: bool = False

    def min_input_size(self) -> int:
        """Smallest input side: every stage's map must cover its GSA sub-sampling kernel."""
        stride, need = 1, 1
        for p, r in zip(self.patch_sizes, self.sr_ratios):
            stride *= p
            need = max(need, stride * r)
        return need

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"Twins expects NHWC images, got shape {x.shape}")
        n = self.min_input_size()
        if x.shape[1] < n or x.shape[2] < n:
            raise ValueError(
                f"Twins needs inputs of at least {n}x{n} (the GSA sub-sampling of every "
                f"stage must fit its map), got {x.shape[1]}x{x.shape[2]}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = drop_path_rates(self.drop_path_rate, self.depths)
        x = x.astype(self.dtype)
        for k, depth in enumerate(self.depths):
            block = functools.partial(
                TwinsBlock, self.num_heads[k], self.mlp_ratios[k], self.sr_ratios[k],
                lsa_mask_padding=self.lsa_mask_padding, norm_eps=self.norm_eps, **kw)
            x = TwinsStage(
                self.embed_dims[k], depth, self.patch_sizes[k], block,
                window_size=None if self.window_sizes is None else self.window_sizes[k],
                drop_path_rates=rates[k], remat=self.remat, scan_blocks=self.scan_blocks,
                name=f"stage{k + 1}", **kw,
            )(x, train=train)
        x = LayerNorm(epsilon=self.norm_eps, name="norm", **kw)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        x = nn.Dense(self.num_classes, name="head", **kw)(x)
        return x.astype(jnp.float32)


_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), window_sizes=(7, 7, 7, 7))

twins_pcpvt_s = functools.partial(Twins, depths=(3, 4, 6, 3), **_PCPVT)
twins_pcpvt_b = functools.partial(Twins, depths=(3, 4, 18, 3), **_PCPVT)
twins_pcpvt_l = functools.partial(Twins, depths=(3, 8, 27, 3), **_PCPVT)
twins_svt_s = functools.partial(Twins, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16),
                                depths=(2, 2, 10, 4), **_SVT)
twins_svt_b = functools.partial(Twins, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                                depths=(2, 2, 18, 2), **_SVT)
twins_svt_l = functools.partial(Twins, embed_dims=(128, 256, 512, 1024),
                                num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2), **_SVT)
