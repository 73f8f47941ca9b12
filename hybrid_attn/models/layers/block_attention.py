"""MaxViT's block attention (Tu et al. 2022, Sec. 3.1), composed from the shared parts.

The map is cut into non-overlapping P x P windows; each window runs multi-head
self-attention with a per-head relative position bias ``B[i - j]`` over the window's
(2P-1) x (2P-1) offsets (the bias of Swin / CoAtNet, Eq. 3 of CoAtNet), then an output
projection. Maps that are not a multiple of P are padded and the padded keys masked.
"""

from __future__ import annotations

from typing import Any

from hybrid_attn.models.layers.attention import Attention, Blocked
from hybrid_attn.models.layers.relative_bias import RelativeBias2D


def BlockAttention(  # noqa: N802 -- a constructor, used like the module it returns
    features: int, head_dim: int = 32, window: int = 7, **kwargs: Any
) -> Attention:
    """Block attention on ``window`` x ``window`` windows (MaxViT: P = 7, head dim 32) with
    ``features // head_dim`` heads; params ``qkv``, ``proj`` and
    ``position/relative_bias_table [2P-1, 2P-1, heads]`` (a map smaller than the window
    uses one window of the map's size, and so a smaller table). ``kwargs``: other
    :class:`Attention` fields (``attn_dropout``, ``dtype``, ``param_dtype``, ``name``)."""
    return Attention(features=features, head_dim=head_dim, out_features=features,
                     pattern=Blocked(window), position=RelativeBias2D, **kwargs)
