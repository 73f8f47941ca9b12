"""timm Twins (``twins_{pcpvt,svt}_{small,base,large}``) state dict -> our variables.

The published names map one to one: ``patch_embeds.{k}`` -> ``stage{k+1}/patch_embed``,
``blocks.{k}.{i}`` -> ``stage{k+1}/block{i}``, ``pos_block.{k}.proj.0`` ->
``stage{k+1}/peg/proj``, ``norm``, ``head``. The fused ``kv`` (GSA) and ``qkv`` (LSA)
linears already use our ``[2|3, heads, head_dim]`` output layout, so only the kernels are
transposed. Every tensor of the state dict must be used, so a checkpoint of a different
architecture fails loudly instead of loading partially.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hybrid_attn.convert import common
from hybrid_attn.models.twins import Twins


def convert(
    state_dict: Mapping, model: Twins, image_shape: Sequence[int] | None = None
) -> dict:
    """Converts a timm Twins state dict for ``model`` (a :class:`~hybrid_attn.models.twins.Twins`).

    ``image_shape`` is accepted for the common converter interface and unused: this
    family's timm tensors carry their full shapes.

    Returns ``{'params': ...}``. Raises ValueError when tensors are missing or left over.
    """
    sd = common.TrackedStateDict(state_dict)
    try:
        params = _convert(sd, model)
    except KeyError as e:
        raise ValueError(f"timm Twins state dict lacks tensor {e.args[0]!r} needed by the model") \
            from e
    sd.check_all_used("this Twins model")
    return {"params": params}


def _convert(sd: Mapping, model: Twins) -> dict:
    params: dict = {}
    for k, depth in enumerate(model.depths):
        stage: dict = {
            "patch_embed": {
                "proj": common.conv(sd, f"patch_embeds.{k}.proj"),
                "norm": common.layer_norm(sd, f"patch_embeds.{k}.norm"),
            },
            "peg": {"proj": common.conv(sd, f"pos_block.{k}.proj.0")},
        }
        for i in range(depth):
            p = f"blocks.{k}.{i}"
            if f"{p}.attn.qkv.weight" in sd:
                attn = {"qkv": common.dense(sd, f"{p}.attn.qkv")}
            else:
                attn = {"q": common.dense(sd, f"{p}.attn.q"),
                        "kv": common.dense(sd, f"{p}.attn.kv")}
                if f"{p}.attn.sr.weight" in sd:
                    attn["sr"] = common.conv(sd, f"{p}.attn.sr")
                    attn["norm"] = common.layer_norm(sd, f"{p}.attn.norm")
            attn["proj"] = common.dense(sd, f"{p}.attn.proj")
            stage[f"block{i}"] = {
                "norm1": common.layer_norm(sd, f"{p}.norm1"),
                "attn": attn,
                "norm2": common.layer_norm(sd, f"{p}.norm2"),
                "mlp": {"fc1": common.dense(sd, f"{p}.mlp.fc1"),
                        "fc2": common.dense(sd, f"{p}.mlp.fc2")},
            }
        params[f"stage{k + 1}"] = stage
    params["norm"] = common.layer_norm(sd, "norm")
    params["head"] = common.dense(sd, "head")
    return params
