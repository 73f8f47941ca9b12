"""Writes tests/goldens/twins_{pcpvt,svt}.npz: timm Twins golden logits for test_twins.py.

Run with the timm venv (the project itself never imports torch)::

    /tmp/timm-venv/bin/python tests/goldens/generate_twins.py

Each file holds one reduced-size timm Twins model with random weights (LayerNorm scales and
every bias randomised too, so a mis-mapped tensor cannot hide behind timm's 1/0 init), its
state dict as numpy arrays under ``sd/<name>``, the model config under ``config`` (JSON, in
our ``Twins`` field names) and, for each case, a float32 NHWC input and timm's eval-mode
logits. Cases: a square input whose maps are divisible by every LSA window, and a
non-square input whose maps are not (and are not divisible by the patch / sub-sampling
strides either), for which our model must use ``lsa_mask_padding=False``.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import torch
from timm.models.twins import Twins

OUT = pathlib.Path(__file__).resolve().parent

# Tiny widths, two blocks per stage (so each stage has the PEG between its blocks and, for
# SVT, one LSA and one GSA block), the published sr ratios and MLP ratios.
MODELS = {
    "pcpvt": dict(
        config=dict(embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depths=[2, 2, 2, 2],
                    mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1], window_sizes=None,
                    num_classes=10),
        # 64x64 -> maps 16, 8, 4, 2; 72x40 -> 18x10, 9x5, 4x2, 2x1 (floors in sr and patches).
        cases={"square": (2, 64, 64), "nonsquare": (2, 72, 40)},
    ),
    "svt": dict(
        config=dict(embed_dims=[8, 16, 24, 32], num_heads=[2, 2, 3, 4], depths=[2, 2, 2, 2],
                    mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 3],
                    num_classes=10),
        # 112x112 -> maps 28, 14, 7, 3: divisible by the windows 7, 7, 7, 3.
        # 72x48 -> 18x12, 9x6, 4x3, 2x1: none divisible, two smaller than their window.
        cases={"square": (1, 112, 112), "nonsquare": (2, 72, 48)},
    ),
}


def timm_model(config: dict) -> Twins:
    return Twins(
        embed_dims=config["embed_dims"], num_heads=config["num_heads"], depths=config["depths"],
        mlp_ratios=config["mlp_ratios"], sr_ratios=config["sr_ratios"],
        wss=config["window_sizes"], num_classes=config["num_classes"],
    ).eval()


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Fan-in scaled normal weights, LayerNorm scales around 1, small random biases."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.2)
        else:
            p.normal_(0.0, 0.2)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    for family, spec in MODELS.items():
        model = timm_model(spec["config"])
        randomize(model)
        out = {"config": np.array(json.dumps(spec["config"]))}
        out.update({f"sd/{k}": v.numpy() for k, v in model.state_dict().items()})
        for case, (b, h, w) in spec["cases"].items():
            x = torch.randn(b, 3, h, w)
            out[f"{case}/input"] = x.permute(0, 2, 3, 1).numpy()
            out[f"{case}/logits"] = model(x).numpy()
        path = OUT / f"twins_{family}.npz"
        np.savez_compressed(path, **out)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
