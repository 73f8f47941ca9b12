"""timm ``ByobNet`` BoTNets (``BottleneckBlock`` / ``SelfAttnBlock`` + ``BottleneckAttn``)
-> :mod:`hybrid_attn.models.botnet`.

Covers ByobNets laid out like the paper's models: a ``7x7`` stem with max pool, ``bottle``
and ``self_attn`` stages with ``conv1x1`` shortcuts, optional SE after the last BatchNorm
of the convolutional blocks (``attn_last``). :func:`convert_block` serves every ByobNet
block, also for :mod:`hybrid_attn.convert.timm_byoanet` (timm's trained tiered-stem BoTNets
and HaloNets).

timm's ``BottleneckAttn`` defaults to ``scale_pos_embed=False`` (position logits from the
unscaled query); build the model with ``scale_position_query=False`` for such weights --
the flag is not stored in the state dict. Names: ``self_attn.qkv`` -> ``spatial/attn/qkv``,
``self_attn.pos_embed.{height,width}_rel`` -> ``spatial/attn/position/rel_{height,width}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import numpy as np

from hybrid_attn.convert import common
from hybrid_attn.convert.timm_resnet import put_bn, stage_blocks


def convert_attention(sd: Mapping, attn: str) -> dict:
    """timm's ``BottleneckAttn`` (fused ``qkv``) or ``HaloAttn`` (``q`` and ``kv``, the
    latter laid out ``[heads, qk + v]`` per head) at ``attn`` -> our ``Attention``'s fused
    ``qkv`` (``[q, k, v]``, each head-major) and relative tables."""
    if f"{attn}qkv.weight" in sd:
        out = {"qkv": common.dense(sd, f"{attn}qkv")}
    else:
        q, kv = (common.dense_kernel(sd[f"{attn}{n}.weight"]) for n in ("q", "kv"))
        dqk = np.shape(sd[f"{attn}pos_embed.height_rel"])[1]
        kv = kv.reshape(kv.shape[0], q.shape[1] // dqk, -1)  # [in, heads, qk + v]
        k, v = (t.reshape(kv.shape[0], -1) for t in (kv[..., :dqk], kv[..., dqk:]))
        out = {"qkv": {"kernel": np.concatenate([q, k, v], axis=1)}}
    if f"{attn}pos_embed.height_rel" in sd:
        out["position"] = {
            "rel_height": common.to_numpy(sd[f"{attn}pos_embed.height_rel"]),
            "rel_width": common.to_numpy(sd[f"{attn}pos_embed.width_rel"]),
        }
    return out


def _channel_attention(sd: Mapping, attn: str) -> dict:
    """timm's SE (``fc1``/``fc2``) or ECA (``conv``, a ``[1, 1, k]`` Conv1d) at ``attn``."""
    if f"{attn}conv.weight" in sd:
        return {"conv": {"kernel": np.transpose(common.to_numpy(sd[f"{attn}conv.weight"]))}}
    return {"reduce": common.dense(sd, f"{attn}fc1"), "expand": common.dense(sd, f"{attn}fc2")}


def convert_block(sd: Mapping, prefix: str) -> tuple[dict, dict]:
    """One ByobNet ``bottle`` or ``self_attn`` block at ``prefix`` (ending in ``.``) ->
    (params, batch_stats) of a :class:`~hybrid_attn.models.resnet.BottleneckBlock`: SE/ECA
    after the 3x3 conv (``attn``) becomes ``channel_attn``, SE after the last BN
    (``attn_last``) ``se``."""
    p: dict = {"conv1": common.conv(sd, f"{prefix}conv1_1x1.conv")}
    st: dict = {}
    put_bn(p, st, "bn1", sd, f"{prefix}conv1_1x1.bn")
    if f"{prefix}post_attn.weight" in sd:
        p["spatial"] = {"attn": convert_attention(sd, f"{prefix}self_attn.")}
        put_bn(p, st, "bn2", sd, f"{prefix}post_attn")
    else:
        p["conv2"] = common.conv(sd, f"{prefix}conv2_kxk.conv")
        put_bn(p, st, "bn2", sd, f"{prefix}conv2_kxk.bn")
    if any(k.startswith(f"{prefix}attn.") for k in sd):
        p["channel_attn"] = _channel_attention(sd, f"{prefix}attn.")
    p["conv3"] = common.conv(sd, f"{prefix}conv3_1x1.conv")
    put_bn(p, st, "bn3", sd, f"{prefix}conv3_1x1.bn")
    if f"{prefix}attn_last.fc1.weight" in sd:
        p["se"] = _channel_attention(sd, f"{prefix}attn_last.")
    if f"{prefix}shortcut.conv.weight" in sd:
        p["shortcut_conv"] = common.conv(sd, f"{prefix}shortcut.conv")
        put_bn(p, st, "shortcut_bn", sd, f"{prefix}shortcut.bn")
    return p, st


def convert(
    state_dict: Mapping, model: nn.Module, image_shape: Sequence[int] | None = None
) -> dict:
    """Maps a timm ByobNet BoTNet state dict onto ``model``'s variables.

    ``image_shape`` is accepted for the common converter interface and unused: this
    family's timm tensors carry their full shapes.

    ``model`` only documents the target; its shapes are checked by
    :func:`hybrid_attn.convert.timm.convert_timm`.
    """
    del model
    sd = common.TrackedStateDict(state_dict)
    params: dict = {"stem": {"conv": common.conv(sd, "stem.conv1.conv")}}
    stats: dict = {"stem": {}}
    put_bn(params["stem"], stats["stem"], "bn", sd, "stem.conv1.bn")
    for (s, b), prefix in sorted(stage_blocks(sd, r"stages\.(\d+)\.(\d+)\.").items()):
        p, st = convert_block(sd, prefix)
        params.setdefault(f"stage{s + 1}", {})[f"block{b}"] = p
        stats.setdefault(f"stage{s + 1}", {})[f"block{b}"] = st
    params["head"] = common.dense(sd, "head.fc")
    sd.check_all_used("the BoTNet")
    return {"params": params, "batch_stats": stats}
