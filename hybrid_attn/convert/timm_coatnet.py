"""timm CoAtNets (``maxxvit.py``) -> ours: the paper-style ``coatnet_0_224`` ...
``coatnet_4_224`` onto ``CoAtNet``, and the rw ``coatnet_0_rw_224`` ... ``coatnext_nano_rw_224``
onto ``CoAtNetRW`` (:mod:`hybrid_attn.models.coatnet_rw`).

The model must be built with the same sizes as the timm one (depths, widths, stem width,
``pre_logits`` for timm's ``head_hidden_size``, head_dim). Name mapping, timm -> ours:

    stem.conv1 / norm1 / conv2                  stem/conv1 / norm1 / conv2
    stages.{i}.blocks.{j}                        stage{i+1}/block{j}
      MBConv: shortcut.expand, pre_norm,         shortcut, pre_norm,
              conv1_1x1, norm1, conv2_kxk,       expand_conv, expand_norm, dw_conv,
              norm2, se.fc1, se.fc2, conv3_1x1   dw_norm, se/reduce, se/expand, project_conv
      Transformer: shortcut.expand, norm1(.norm) shortcut, norm1,
              attn.qkv, attn.proj,               attn/qkv, attn/proj,
              attn.rel_pos.relative_position_bias_table   attn/position/relative_bias_table
              norm2, mlp.fc1, mlp.fc2            norm2, mlp/fc1, mlp/fc2
    head.norm, head.pre_logits.fc, head.fc       head_norm, pre_logits, head

and in the rw models (the same names where not listed):

    MBConv se_early.fc1 / fc2                    se/reduce / se/expand
    Transformer ls1.gamma, ls2.gamma             layer_scale1/scale, layer_scale2/scale
      attn.rel_pos.mlp.fc1 / fc2 (rmlp)          attn/position/fc1 / fc2
    ConvNeXt: shortcut(.expand), conv_dw, norm,  shortcut, dw_conv, norm,
              mlp.fc1, mlp.fc2, ls.gamma         mlp/fc1, mlp/fc2, layer_scale/scale
    norm (before pooling), head.fc               norm, head

A norm with running statistics (BatchNorm: the stem, MBConv, ``coatnet_bn_0_rw``'s
transformer and final norms) maps to params + ``batch_stats``; one without to LayerNorm.

timm's fused ``qkv`` output channels are ordered ``[heads, 3, head_dim]`` (its
``head_first`` layout); ours are ``[3, heads, head_dim]``. Its bias tables are flat
``[(2H-1)(2W-1), heads]``; ours are ``[2H-1, 2W-1, heads]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hybrid_attn.convert import common
from hybrid_attn.models.layers.relative_bias import TABLE_NAME


def _qkv(sd: Mapping, prefix: str, head_dim: int) -> dict:
    """timm's head-first fused qkv ``[heads, 3, d]`` channels -> our ``[3, heads, d]``."""
    out = common.dense(sd, prefix)
    c_in, c3 = out["kernel"].shape
    heads = c3 // (3 * head_dim)
    out["kernel"] = (out["kernel"].reshape(c_in, heads, 3, head_dim)
                     .transpose(0, 2, 1, 3).reshape(c_in, c3))
    out["bias"] = out["bias"].reshape(heads, 3, head_dim).transpose(1, 0, 2).reshape(c3)
    return out


def _table(flat: np.ndarray, shape: tuple[int, ...] | None, name: str) -> np.ndarray:
    """A flat ``[(2H-1)(2W-1), heads]`` table -> ``[2H-1, 2W-1, heads]``.

    ``shape`` is the model's table shape at the intended input size; without it the
    table must come from a square map (as every published checkpoint does).
    """
    n, heads = flat.shape
    if shape is None:
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise ValueError(
                f"{name}: a table of {n} offsets is not from a square map; pass "
                "image_shape to convert() so the model's table shape can be used"
            )
        shape = (side, side, heads)
    if shape[0] * shape[1] != n or shape[2] != heads:
        raise ValueError(f"{name}: timm table {flat.shape} cannot be reshaped to {shape}")
    return flat.reshape(shape)


def _norm(sd: Mapping, prefix: str, params: dict, stats: dict, ours: str) -> None:
    """timm's norm at ``prefix`` into ``params[ours]`` (and ``stats[ours]`` for a BatchNorm,
    told apart by its running statistics)."""
    if f"{prefix}.running_mean" in sd:
        params[ours], stats[ours] = common.batch_norm(sd, prefix)
    else:
        params[ours] = common.layer_norm(sd, prefix)


def _mlp(sd: Mapping, p: str) -> dict:
    return {"fc1": common.dense(sd, f"{p}.fc1"), "fc2": common.dense(sd, f"{p}.fc2")}


def _layer_scale(sd: Mapping, key: str, params: dict, ours: str) -> None:
    if key in sd:
        params[ours] = {"scale": common.to_numpy(sd[key])}


def _shortcut(sd: Mapping, p: str, params: dict) -> None:
    """A strided block's pool + 1x1 conv (``shortcut.expand``) or a plain 1x1 conv."""
    for key in (f"{p}.shortcut.expand", f"{p}.shortcut"):
        if f"{key}.weight" in sd:
            params["shortcut"] = common.conv(sd, key)
            return


def _mbconv(sd: Mapping, p: str) -> tuple[dict, dict]:
    params, stats = {}, {}
    for theirs, ours in (("pre_norm", "pre_norm"), ("norm1", "expand_norm"),
                         ("norm2", "dw_norm")):
        params[ours], stats[ours] = common.batch_norm(sd, f"{p}.{theirs}")
    for theirs, ours in (("conv1_1x1", "expand_conv"), ("conv2_kxk", "dw_conv"),
                         ("conv3_1x1", "project_conv")):
        params[ours] = common.conv(sd, f"{p}.{theirs}")
    se = f"{p}.se_early" if f"{p}.se_early.fc1.weight" in sd else f"{p}.se"
    params["se"] = {"reduce": common.dense(sd, f"{se}.fc1"),
                    "expand": common.dense(sd, f"{se}.fc2")}
    _shortcut(sd, p, params)
    return params, stats


def _convnext(sd: Mapping, p: str) -> dict:
    params = {"dw_conv": common.conv(sd, f"{p}.conv_dw"),
              "norm": common.layer_norm(sd, f"{p}.norm"), "mlp": _mlp(sd, f"{p}.mlp")}
    _layer_scale(sd, f"{p}.ls.gamma", params, "layer_scale")
    _shortcut(sd, p, params)
    return params


def _transformer(sd: Mapping, p: str, head_dim: int, table_shape) -> tuple[dict, dict]:
    params, stats = {}, {}
    _norm(sd, f"{p}.norm1.norm" if f"{p}.norm1.norm.weight" in sd else f"{p}.norm1",
          params, stats, "norm1")
    _norm(sd, f"{p}.norm2", params, stats, "norm2")
    table = f"{p}.attn.rel_pos.relative_position_bias_table"
    if table in sd:
        position = {TABLE_NAME: _table(common.to_numpy(sd[table]), table_shape, table)}
    else:
        position = _mlp(sd, f"{p}.attn.rel_pos.mlp")
    params["attn"] = {"qkv": _qkv(sd, f"{p}.attn.qkv", head_dim),
                      "proj": common.dense(sd, f"{p}.attn.proj"), "position": position}
    params["mlp"] = _mlp(sd, f"{p}.mlp")
    for i in (1, 2):
        _layer_scale(sd, f"{p}.ls{i}.gamma", params, f"layer_scale{i}")
    if f"{p}.shortcut.expand.weight" in sd:
        params["shortcut"] = common.dense(sd, f"{p}.shortcut.expand")
    return params, stats


def convert(
    state_dict: Mapping, model: nn.Module, image_shape: Sequence[int] | None = None
) -> dict:
    """Maps a timm CoAtNet state dict onto ``model``'s ``{'params', 'batch_stats'}``.

    ``image_shape`` (NHWC) is only needed for tables from a non-square input (timm models
    built with a non-square ``img_size``); published checkpoints are square.

    Raises:
      ValueError: for a tensor of the state dict that has no place in the model.
    """
    sd = common.TrackedStateDict(state_dict)
    table_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    if image_shape is not None:
        ref = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False)
        )["params"]
        table_shapes = {k[:2]: v.shape for k, v in traverse_util.flatten_dict(ref).items()
                        if k[-1] == TABLE_NAME}

    params = {"stem": {"conv1": common.conv(sd, "stem.conv1"),
                       "conv2": common.conv(sd, "stem.conv2")}}
    stats: dict = {"stem": {}}
    _norm(sd, "stem.norm1", params["stem"], stats["stem"], "norm1")
    blocks = sorted({(int(m[1]), int(m[2])) for k in sd
                     if (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k))})
    for i, j in blocks:
        stage, block, p = f"stage{i + 1}", f"block{j}", f"stages.{i}.blocks.{j}"
        bs: dict = {}
        if f"{p}.conv1_1x1.weight" in sd:
            bp, bs = _mbconv(sd, p)
        elif f"{p}.conv_dw.weight" in sd:
            bp = _convnext(sd, p)
        else:
            bp, bs = _transformer(sd, p, model.head_dim, table_shapes.get((stage, block)))
        params.setdefault(stage, {})[block] = bp
        if bs:
            stats.setdefault(stage, {})[block] = bs

    if "head.norm.weight" in sd:  # paper-style: pool, then norm (and pre-logits)
        params["head_norm"] = common.layer_norm(sd, "head.norm")
    else:  # rw: norm at every position, then pool
        _norm(sd, "norm", params, stats, "norm")
    if "head.pre_logits.fc.weight" in sd:
        params["pre_logits"] = common.dense(sd, "head.pre_logits.fc")
    params["head"] = common.dense(sd, "head.fc")

    sd.check_all_used("CoAtNet")
    stats = {k: v for k, v in stats.items() if v}
    return {"params": params, "batch_stats": stats} if stats else {"params": params}
