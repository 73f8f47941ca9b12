"""timm's trained BoTNets and HaloNets (``timm.models.byoanet``, ByobNets with a tiered stem)
-> :mod:`hybrid_attn.models.byoanet`.

Names: ``stem.conv{1,2,3}.{conv,bn}`` -> ``stem/conv{i}``, ``stem/bn{i}``; the blocks
``stages.S.B.`` -> ``stage{S+1}/block{B}`` through
:func:`hybrid_attn.convert.timm_botnet.convert_block` (``attn`` -> ``channel_attn``,
``self_attn`` -> ``spatial/attn``, ``HaloAttn``'s ``q`` and per-head ``kv`` fused into
``qkv``); ``final_conv.{conv,bn}`` -> ``final_conv``, ``final_bn``; ``head.fc`` -> ``head``.
Every tensor must be used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn

from hybrid_attn.convert import common
from hybrid_attn.convert.timm_botnet import convert_block
from hybrid_attn.convert.timm_resnet import put_bn, stage_blocks


def convert(
    state_dict: Mapping, model: nn.Module, image_shape: Sequence[int] | None = None
) -> dict:
    """Maps a timm byoanet state dict onto the variables of a
    :class:`~hybrid_attn.models.byoanet.ByoaNet` (``model`` and ``image_shape`` are accepted
    for the common interface and unused: every tensor carries its full shape)."""
    del model, image_shape
    sd = common.TrackedStateDict(state_dict)
    params: dict = {"stem": {}, "head": common.dense(sd, "head.fc")}
    stats: dict = {"stem": {}}
    for i in (1, 2, 3):
        params["stem"][f"conv{i}"] = common.conv(sd, f"stem.conv{i}.conv")
        put_bn(params["stem"], stats["stem"], f"bn{i}", sd, f"stem.conv{i}.bn")
    for (s, b), prefix in sorted(stage_blocks(sd, r"stages\.(\d+)\.(\d+)\.").items()):
        p, st = convert_block(sd, prefix)
        params.setdefault(f"stage{s + 1}", {})[f"block{b}"] = p
        stats.setdefault(f"stage{s + 1}", {})[f"block{b}"] = st
    if "final_conv.conv.weight" in sd:
        params["final_conv"] = common.conv(sd, "final_conv.conv")
        put_bn(params, stats, "final_bn", sd, "final_conv.bn")
    sd.check_all_used("the BoTNet / HaloNet (timm byoanet)")
    return {"params": params, "batch_stats": stats}
