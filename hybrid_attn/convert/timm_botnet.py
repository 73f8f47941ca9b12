"""timm ``ByobNet`` BoTNets (``BottleneckBlock`` / ``SelfAttnBlock`` + ``BottleneckAttn``)
-> :mod:`hybrid_attn.models.botnet`.

Covers ByobNets laid out like the paper's models: a ``7x7`` stem with max pool, ``bottle``
and ``self_attn`` stages with ``conv1x1`` shortcuts, optional SE after the last BatchNorm
of the convolutional blocks (``attn_last``). timm's pretrained ``botnet26t`` /
``sebotnet33ts`` / ``botnet50ts`` use tiered 3-conv stems and other stage layouts and are
rejected (unused or missing tensors are named).

timm's ``BottleneckAttn`` defaults to ``scale_pos_embed=False`` (position logits from the
unscaled query); build the model with ``scale_position_query=False`` for such weights --
the flag is not stored in the state dict. Names: ``self_attn.qkv`` -> ``spatial/attn/qkv``,
``self_attn.pos_embed.{height,width}_rel`` -> ``spatial/attn/position/rel_{height,width}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn

from hybrid_attn.convert import common
from hybrid_attn.convert.timm_resnet import put_bn, stage_blocks


def convert_block(sd: Mapping, prefix: str) -> tuple[dict, dict]:
    """One ByobNet ``bottle`` or ``self_attn`` block at ``prefix`` (ending in ``.``) ->
    (params, batch_stats) of a :class:`~hybrid_attn.models.resnet.BottleneckBlock`."""
    p: dict = {"conv1": common.conv(sd, f"{prefix}conv1_1x1.conv")}
    st: dict = {}
    put_bn(p, st, "bn1", sd, f"{prefix}conv1_1x1.bn")
    if f"{prefix}self_attn.qkv.weight" in sd:
        attn = f"{prefix}self_attn."
        p["spatial"] = {"attn": {"qkv": common.dense(sd, f"{attn}qkv")}}
        if f"{attn}pos_embed.height_rel" in sd:
            p["spatial"]["attn"]["position"] = {
                "rel_height": common.to_numpy(sd[f"{attn}pos_embed.height_rel"]),
                "rel_width": common.to_numpy(sd[f"{attn}pos_embed.width_rel"]),
            }
        put_bn(p, st, "bn2", sd, f"{prefix}post_attn")
    else:
        p["conv2"] = common.conv(sd, f"{prefix}conv2_kxk.conv")
        put_bn(p, st, "bn2", sd, f"{prefix}conv2_kxk.bn")
    p["conv3"] = common.conv(sd, f"{prefix}conv3_1x1.conv")
    put_bn(p, st, "bn3", sd, f"{prefix}conv3_1x1.bn")
    if f"{prefix}attn_last.fc1.weight" in sd:
        p["se"] = {"reduce": common.dense(sd, f"{prefix}attn_last.fc1"),
                   "expand": common.dense(sd, f"{prefix}attn_last.fc2")}
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
