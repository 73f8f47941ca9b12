"""timm ``ResNet`` (``timm.models.resnet``, Bottleneck blocks) -> :mod:`hybrid_attn.models.resnet`.

Covers the plain 7x7-stem bottleneck ResNets (resnet26/50/101/152 and their SE variants
whose SE sits after the last BatchNorm, ``se.fc1/fc2``). Every tensor of the state dict
must be used: a checkpoint with parts this mapping does not know (deep stems, average-pool
shortcuts, ...) is rejected with the unused names rather than silently half-loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn

from hybrid_attn.convert import common


def put_bn(params: dict, stats: dict, name: str, sd: Mapping, prefix: str) -> None:
    """Stores the BatchNorm at ``prefix`` as ``params[name]`` / ``stats[name]``."""
    params[name], stats[name] = common.batch_norm(sd, prefix)


def stage_blocks(sd: Mapping, pattern: str) -> dict[tuple[int, int], str]:
    """``{(stage, block): prefix}`` for every block prefix matching ``pattern`` (two groups)."""
    found = {}
    for key in sd:
        m = re.match(pattern, key)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = m.group(0)
    return found


def convert(
    state_dict: Mapping, model: nn.Module, image_shape: Sequence[int] | None = None
) -> dict:
    """Maps a timm ResNet state dict onto ``model``'s variables (``params``, ``batch_stats``).

    ``image_shape`` is accepted for the common converter interface and unused: this
    family's timm tensors carry their full shapes.

    ``model`` only documents the target; its shapes are checked by
    :func:`hybrid_attn.convert.timm.convert_timm`.
    """
    del model
    sd = common.TrackedStateDict(state_dict)
    params: dict = {"stem": {"conv": common.conv(sd, "conv1")}}
    stats: dict = {"stem": {}}
    put_bn(params["stem"], stats["stem"], "bn", sd, "bn1")
    for (s, b), prefix in sorted(stage_blocks(sd, r"layer(\d+)\.(\d+)\.").items()):
        p: dict = {}
        st: dict = {}
        for i in (1, 2, 3):
            p[f"conv{i}"] = common.conv(sd, f"{prefix}conv{i}")
            put_bn(p, st, f"bn{i}", sd, f"{prefix}bn{i}")
        if f"{prefix}downsample.0.weight" in sd:
            p["shortcut_conv"] = common.conv(sd, f"{prefix}downsample.0")
            put_bn(p, st, "shortcut_bn", sd, f"{prefix}downsample.1")
        if f"{prefix}se.fc1.weight" in sd:
            p["se"] = {"reduce": common.dense(sd, f"{prefix}se.fc1"),
                       "expand": common.dense(sd, f"{prefix}se.fc2")}
        params.setdefault(f"stage{s}", {})[f"block{b}"] = p
        stats.setdefault(f"stage{s}", {})[f"block{b}"] = st
    params["head"] = common.dense(sd, "fc")
    sd.check_all_used("the ResNet")
    return {"params": params, "batch_stats": stats}
