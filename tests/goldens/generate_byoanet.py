"""Writes tests/goldens/byoanet.npz, byoanet_halo.npz and byoanet_timm.json for
test_byoanet.py: timm's trained BoTNets and HaloNets (``byoanet.py``, built on ``ByobNet``),
whose weights ``from_timm`` imports.

Run with the timm venv (the project itself never imports torch)::

    /work/timm-venv/bin/python tests/goldens/generate_byoanet.py

``byoanet.npz``: each of the eight configs (timm's own ``model_cfgs[...]``, so the stem
type and pool, activation, SE / ECA, group size, final 1x1 conv width, attention layer and
its per-block keyword arguments are timm's) reduced by :func:`reduced`: channels / 16, the
stem 16 wide, group size 4 instead of 16 (still 2-4 groups), halo blocks 4 instead of 8
(halo sizes kept), and each stage cut to its first block plus the first block of every other
kind after it (so a stage still has a strided block, a plain one, and each attention
kind). Weights and BatchNorm statistics are random (:func:`randomize`) and rounded to
float16; timm ran on exactly those values in float32. Keys: ``input`` (uint8 NHWC, 2 x 128
x 256, shared; the float input is ``(input - 128) / 64``): 128 x 256 puts a 4 x 8 grid of
4 x 4 halo blocks on the stride-8 map, 2 x 4 on the stride-16 one and 1 x 2 on the
stride-32 one (halonet50ts attends there at stride 1), and gives BoTNet's fixed-size
tables non-square 8 x 16 and 4 x 8 maps; per case ``<case>/weights`` (the state dict's
float tensors flattened and concatenated, ``num_batches_tracked`` left out) and
``<case>/logits`` (timm, eval mode); ``config`` (JSON): ``hw``, per case the reduced timm
config (``repr``) and ``index``, the ``(name, shape)`` list that splits ``weights``.

``byoanet_halo.npz``: timm's ``HaloAttn`` layer alone at the paper's block size 8 on a
non-square 16 x 24 map (a 2 x 3 block grid, padding at every edge), 16 channels, 4 heads:
``s1`` halo 3 stride 1; ``s2`` halo 2 stride 2 (strided query blocks) with ``dim_head=8``
(query/key heads wider than value heads). Keys ``<case>/{q,kv,height_rel,width_rel}``
(torch layouts) and ``<case>/input`` (NHWC), float16; ``<case>/output`` (NHWC, float32, timm
on those float16 values).

``byoanet_timm.json``: per full-size timm model, its parameter count and, per pretrained tag,
timm's preprocessing (input size, mean, std, interpolation, crop_pct, crop_mode) and class
count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import timm
import torch
from generate_coatnet import save
from generate_coatnet_rw import half
from timm.layers.halo_attn import HaloAttn
from timm.models.byoanet import model_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, expand_blocks_cfg

OUT = pathlib.Path(__file__).resolve().parent

HW = (128, 256)
NUM_CLASSES = 5
STEM_CHS = 16
GROUP_SIZE = 4
HALO_BLOCK = 4
# golden case (our variant name) -> timm config name; timm model name -> its config.
CASES = {
    "botnet26t": "botnet26t", "sebotnet33ts": "sebotnet33ts",
    "eca_botnext26ts": "eca_botnext26ts", "halonet26t": "halonet26t",
    "sehalonet33ts": "sehalonet33ts", "halonet50ts": "halonet50ts",
    "eca_halonext26ts": "eca_halonext26ts", "halo2botnet50ts": "halo2botnet50ts",
}
TIMM_NAMES = (
    "botnet26t_256", "sebotnet33ts_256", "eca_botnext26ts_256", "halonet26t",
    "sehalonet33ts", "halonet50ts", "eca_halonext26ts", "halo2botnet50ts_256",
)
PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode",
                 "num_classes")
HALO_CASES = {
    "s1": dict(dim=16, num_heads=4, block_size=8, halo_size=3, stride=1),
    "s2": dict(dim=16, num_heads=4, block_size=8, halo_size=2, stride=2, dim_head=8),
}
HALO_HW = (16, 24)


def _small_attn_kwargs(layer: str | None, kwargs: dict | None) -> dict | None:
    if layer == "halo" and kwargs is not None:
        return {**kwargs, "block_size": HALO_BLOCK}
    return kwargs


def _small_width(c: int) -> int:
    return c // 16 if c <= 1024 else c // 32


def _small_block(b: ByoBlockCfg, model: ByoModelCfg) -> ByoBlockCfg:
    layer = b.self_attn_layer or model.self_attn_layer
    return dataclasses.replace(
        b, c=_small_width(b.c), gs=GROUP_SIZE if b.gs else b.gs,
        self_attn_kwargs=_small_attn_kwargs(layer, b.self_attn_kwargs),
    )


def _kind(b: ByoBlockCfg) -> tuple:
    return b.type, b.self_attn_layer, repr(b.self_attn_kwargs)


def reduced(cfg_name: str) -> ByoModelCfg:
    """timm's config ``cfg_name`` at test size (see the module docstring)."""
    cfg = model_cfgs[cfg_name]
    stages = []
    for stage in cfg.blocks:
        blocks = expand_blocks_cfg(stage)
        kept, kinds = [blocks[0]], {_kind(blocks[0])}
        for b in blocks[1:]:
            if _kind(b) not in kinds:
                kept.append(b)
                kinds.add(_kind(b))
        stages.append(tuple(_small_block(b, cfg) for b in kept))
    return dataclasses.replace(
        cfg, blocks=tuple(stages), stem_chs=STEM_CHS,
        num_features=cfg.num_features // 16,
        self_attn_kwargs=_small_attn_kwargs(cfg.self_attn_layer, cfg.self_attn_kwargs),
    )


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Fan-in scaled weights, BatchNorm scales around 1, random biases and statistics, and
    relative tables at std 0.5 so that the position logits move the attention."""
    for name, p in model.named_parameters():
        if name.endswith(("height_rel", "width_rel")):
            p.normal_(0.0, 0.5)
        elif p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        else:
            p.normal_(0.0, 0.2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.add_(1.0)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)


@torch.no_grad()
def goldens() -> dict:
    low = torch.randn(2, 3, 8, 12)
    smooth = torch.nn.functional.interpolate(low, size=HW, mode="bilinear")
    u8 = (128 + 40 * smooth + 24 * torch.randn(2, 3, *HW)).round().clamp(0, 255)
    x = (u8 - 128) / 64
    out: dict = {"input": u8.permute(0, 2, 3, 1).to(torch.uint8).numpy()}
    index, configs = {}, {}
    for case, cfg_name in CASES.items():
        cfg = reduced(cfg_name)
        model = ByobNet(cfg, num_classes=NUM_CLASSES, img_size=HW).eval()
        randomize(model)
        for t in list(model.parameters()) + list(model.buffers()):
            t.copy_(half(t))
        sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        index[case] = [(k, list(v.shape)) for k, v in sd.items()]
        configs[case] = repr(cfg)
        out[f"{case}/weights"] = torch.cat([v.flatten() for v in sd.values()]).half().numpy()
        out[f"{case}/logits"] = model(x).numpy()
        print(f"{case}: {sum(v.numel() for v in sd.values())} values, "
              f"logit std {out[f'{case}/logits'].std():.2f}")
    out["config"] = np.array(json.dumps({"hw": HW, "configs": configs, "index": index}))
    return out


@torch.no_grad()
def halo_goldens() -> dict:
    out = {}
    for case, kw in HALO_CASES.items():
        layer = HaloAttn(**kw).eval()
        randomize(layer)
        for p in layer.parameters():
            p.copy_(half(p))
        x = half(torch.randn(2, kw["dim"], *HALO_HW))
        out[f"{case}/input"] = x.permute(0, 2, 3, 1).half().numpy()
        out[f"{case}/output"] = layer(x).permute(0, 2, 3, 1).numpy()
        out[f"{case}/q"] = layer.q.weight.half().numpy()
        out[f"{case}/kv"] = layer.kv.weight.half().numpy()
        out[f"{case}/height_rel"] = layer.pos_embed.height_rel.half().numpy()
        out[f"{case}/width_rel"] = layer.pos_embed.width_rel.half().numpy()
    out["config"] = np.array(json.dumps({"cases": HALO_CASES, "hw": HALO_HW}))
    return out


def timm_facts() -> dict:
    facts = {}
    for name in TIMM_NAMES:
        with torch.device("meta"):
            model = timm.create_model(name)
        tags = {}
        for tag in timm.list_pretrained(f"{name}.*"):
            cfg = timm.models.get_pretrained_cfg(tag).to_dict()
            tags[tag] = {k: cfg[k] for k in PREPROCESSING}
        facts[name] = {"params": sum(p.numel() for p in model.parameters()), "pretrained": tags}
    return facts


def main() -> None:
    torch.manual_seed(0)
    save("byoanet.npz", goldens())
    save("byoanet_halo.npz", halo_goldens())
    path = OUT / "byoanet_timm.json"
    path.write_text(json.dumps(timm_facts(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
