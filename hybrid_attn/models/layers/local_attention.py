"""SASA's local self-attention layer (Ramachandran et al. 2019, Eq. 3), composed from parts.

Every pixel ij attends to the pixels ab of its k x k neighbourhood, with relative
embeddings added on the keys,

    y_ij = sum_ab softmax_ab(q_ij . (k_ab + r_{a-i, b-j}) / sqrt(d)) v_ab,

per head, where ``r_{a-i,b-j}`` concatenates a row-offset and a column-offset embedding
(half of the head dimension each). The paper's Eq. 3 writes ``q . k + q . r`` with no
scale at all; we use the standard scaled dot product on the whole logit (content and
position term alike), as the attention of every other family here does. Keys outside the
image are masked out (they are not zero-padding tokens), so a border pixel attends to
fewer than k*k keys. The computation is block-wise (memory: see
:mod:`~hybrid_attn.models.layers.attention_kernels`).
"""

from __future__ import annotations

import functools
from typing import Any

from hybrid_attn.models.layers.attention import Attention, Blocked
from hybrid_attn.models.layers.relative_logits import RelativeEmbedding2D


def LocalSelfAttention(  # noqa: N802 -- a constructor, used like the module it returns
    features: int,
    num_heads: int = 8,
    kernel_size: int = 7,
    block_size: int = 4,
    row_chunk: int | None = 1,
    batch_chunk: int | None = 4,
    **kwargs: Any,
) -> Attention:
    """SASA's layer: k x k neighbourhoods, ``num_heads`` heads, relative row/column
    embeddings, bias-free q/k/v projections and no output projection.

    Params: ``qkv`` (``[3, heads, head_dim]`` output channels) and ``position/rel_row``,
    ``position/rel_col`` ``[k, head_dim/2]`` (:class:`RelativeEmbedding2D`; their size
    depends only on k, so a new resolution needs no resizing). ``block_size`` (largest
    query block side), ``row_chunk`` (block rows per sequential step, None = all) and
    ``batch_chunk`` (images per step, None = all) trade memory for speed and never change
    the result. The defaults were measured on CPU at batch 8, where they are the fastest
    and smallest (``attention_kernels``' table); on an accelerator with a large per-device
    batch, ``row_chunk=None`` (one vectorised step) is the form to try first. ``kwargs``: other
    :class:`Attention` fields (``dtype``, ``param_dtype``, ``name``).
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    return Attention(
        features=features, num_heads=num_heads, qkv_bias=False,
        pattern=Blocked(block_size, halo=kernel_size // 2, window=kernel_size,
                        row_chunk=row_chunk, batch_chunk=batch_chunk),
        position=functools.partial(RelativeEmbedding2D, window=kernel_size),
        **kwargs,
    )
