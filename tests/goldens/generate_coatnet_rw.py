"""Writes tests/goldens/coatnet_rw.npz and coatnet_rw_timm.json for test_coatnet_rw.py: timm's
"rw" CoAtNets (``maxxvit.py``), whose trained weights ``from_timm`` imports.

Run with the timm venv (the project itself never imports torch)::

    /work/timm-venv/bin/python tests/goldens/generate_coatnet_rw.py

``coatnet_rw.npz``: every distinct timm config of the family (``model_cfgs[...]``, so each
variant's flags -- stride mode, pool type, SE placement and activation, pre-norm
activation, output and shortcut biases, LayerScale, BatchNorm transformer blocks, relative
bias table or MLP, ConvNeXt blocks -- are timm's own) at a reduced size (``SIZES``), with
random weights, BatchNorm statistics, norm scales, layer scales and bias tables drawn by
``generate_coatnet.randomize``. Weights and inputs are rounded to float16 and stored so
(half the file size); timm ran on exactly those values in float32. Keys: ``input`` (NHWC,
64x96, shared by every case), per case ``<case>/weights`` (the timm state dict's float
tensors flattened and concatenated: one array instead of a hundred keeps the file small;
``num_batches_tracked`` counters are left out) and ``<case>/logits`` (timm, eval mode);
``config`` (JSON) holds ``SIZES``, the timm config of each case and ``index``, per case the
``(name, shape)`` list that splits ``weights`` back into the state dict.
``rmlp_2_rw/logits_square`` are the same weights on ``input_square`` (64x64): the MLP bias
has no table, and the resolution is all ``coatnet_rmlp_2_rw_384`` changes.

``coatnet_rw_timm.json``: per full-size timm model, its parameter count at its default class
count (``num_classes``: 11821 for ``coatnet_3_rw_224``, whose only weights are ImageNet-12k)
and, per pretrained tag, timm's preprocessing (input size, mean, std, interpolation,
crop_pct, crop_mode) and class count.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import timm
import torch
from generate_coatnet import image, randomize, save
from timm.models.maxxvit import MaxxVit, model_cfgs

OUT = pathlib.Path(__file__).resolve().parent

# One strided MBConv (S1), a strided and a plain one (S2), a strided transformer (S3), a
# strided and a plain one (S4); head_dim 4 gives 2, 4 and 4 heads (the rw attention is as
# wide as its input). ``rel_pos_dim`` is the hidden width of the rmlp bias MLP.
SIZES = dict(embed_dim=(8, 8, 16, 16), depths=(1, 2, 1, 2), stem_width=(4, 8), dim_head=4,
             rel_pos_dim=32, num_classes=5)
HW, HW_SQUARE = (64, 96), (64, 64)
# golden case -> timm config (``coatnet_rmlp_2_rw_384`` is ``coatnet_rmlp_2_rw`` at 384).
CASES = {case: f"coatnet_{case}" for case in (
    "nano_rw", "0_rw", "1_rw", "2_rw", "3_rw", "bn_0_rw", "rmlp_nano_rw", "rmlp_1_rw",
    "rmlp_1_rw2", "rmlp_2_rw")} | {"coatnext_nano_rw": "coatnext_nano_rw"}
TIMM_NAMES = (
    "coatnet_nano_rw_224", "coatnet_0_rw_224", "coatnet_1_rw_224", "coatnet_2_rw_224",
    "coatnet_3_rw_224", "coatnet_bn_0_rw_224", "coatnet_rmlp_nano_rw_224",
    "coatnet_rmlp_1_rw_224", "coatnet_rmlp_1_rw2_224", "coatnet_rmlp_2_rw_224",
    "coatnet_rmlp_2_rw_384", "coatnext_nano_rw_224",
)
PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode",
                 "num_classes")


def reduced(cfg_name: str, hw: tuple[int, int]) -> MaxxVit:
    cfg = model_cfgs[cfg_name]
    cfg = dataclasses.replace(
        cfg, embed_dim=SIZES["embed_dim"], depths=SIZES["depths"],
        stem_width=SIZES["stem_width"],
        transformer_cfg=dataclasses.replace(cfg.transformer_cfg, dim_head=SIZES["dim_head"],
                                            rel_pos_dim=SIZES["rel_pos_dim"]),
    )
    return MaxxVit(cfg, img_size=hw, num_classes=SIZES["num_classes"]).eval()


def half(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 precision, kept float32 (what the stored file holds)."""
    return x.half().float() if x.is_floating_point() else x


@torch.no_grad()
def goldens() -> dict:
    out: dict = {}
    index: dict = {}
    inputs = {"": half(image(HW)), "_square": half(image(HW_SQUARE))}
    for suffix, x in inputs.items():
        out[f"input{suffix}"] = x.permute(0, 2, 3, 1).half().numpy()
    for case, cfg_name in CASES.items():
        model = reduced(cfg_name, HW)
        randomize(model)
        for t in list(model.parameters()) + list(model.buffers()):
            t.copy_(half(t))
        sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        index[case] = [(k, list(v.shape)) for k, v in sd.items()]
        out[f"{case}/weights"] = torch.cat([v.flatten() for v in sd.values()]).half().numpy()
        out[f"{case}/logits"] = model(inputs[""]).numpy()
        if case == "rmlp_2_rw":
            square = reduced(cfg_name, HW_SQUARE)
            square.load_state_dict(model.state_dict())
            out[f"{case}/logits_square"] = square(inputs["_square"]).numpy()
    out["config"] = np.array(json.dumps({"sizes": SIZES, "cases": CASES, "index": index}))
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
        facts[name] = {"params": sum(p.numel() for p in model.parameters()),
                       "num_classes": model.num_classes, "pretrained": tags}
    return facts


def main() -> None:
    torch.manual_seed(0)
    save("coatnet_rw.npz", goldens())
    path = OUT / "coatnet_rw_timm.json"
    path.write_text(json.dumps(timm_facts(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
