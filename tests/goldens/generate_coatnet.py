"""Writes tests/goldens/coatnet_*.npz: timm CoAtNet goldens for test_coatnet.py and
test_relative_bias.py.

Run with the timm venv (the project itself never imports torch)::

    /tmp/timm-venv/bin/python tests/goldens/generate_coatnet.py

``coatnet_tiny.npz`` and ``coatnet_nonsquare.npz`` each hold a reduced-size timm
``MaxxVit`` with the paper-style ``coatnet_0_224`` block configs (C-C-T-T, pre-logits head)
and random weights: every tensor is redrawn, including BatchNorm running means/variances,
norm scales, biases and the relative bias tables (at a scale that moves the logits), so a
mis-mapped or mis-oriented tensor cannot hide behind timm's init. Keys: ``sd/<name>`` the
timm state dict, ``config`` our ``CoAtNet`` fields (JSON), and per case ``<case>/input``
(NHWC float32, low-frequency structure plus noise so the logits depend on the image) and
``<case>/logits`` (timm, eval mode). ``coatnet_tiny.npz`` has the case ``depthwise`` and,
with the same weights in a timm model built with ``stride_mode='1x1'``, the case ``expand``.
``coatnet_resize.npz`` holds random bias tables and timm's ``resize_rel_pos_bias_table`` of
them (the resampling timm applies at a new resolution).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

OUT = pathlib.Path(__file__).resolve().parent

# Two blocks per stage (a strided and a plain block of each kind); head_dim 16 so the
# transformer stages have 2 and 3 heads. 64x64 -> S3 map 4x4, S4 2x2; 64x96 -> 4x6, 2x3.
SIZES = dict(depths=(2, 2, 2, 2), widths=(16, 16, 32, 48), stem_width=8, head_dim=16,
             num_classes=10)
STRIDE_MODES = {"depthwise": "dw", "expand": "1x1"}  # our stride_at -> timm's stride_mode
# (old window, new window, pass old_window_size): non-square upsizing, square
# upsizing as at checkpoint load (source size inferred), and downsizing.
RESIZES = {"up_nonsquare": ((3, 3), (5, 7), True), "up_square": ((4, 4), (7, 7), False),
           "down": ((7, 5), (4, 3), True)}
HEADS = 3


def timm_model(hw: tuple[int, int], stride_at: str = "depthwise") -> MaxxVit:
    cfg = MaxxVitCfg(
        embed_dim=SIZES["widths"], depths=SIZES["depths"], stem_width=SIZES["stem_width"],
        head_hidden_size=SIZES["widths"][-1],
        conv_cfg=MaxxVitConvCfg(stride_mode=STRIDE_MODES[stride_at]),
        transformer_cfg=MaxxVitTransformerCfg(dim_head=SIZES["head_dim"]),
    )
    return MaxxVit(cfg, img_size=hw, num_classes=SIZES["num_classes"]).eval()


def image(hw: tuple[int, int]) -> torch.Tensor:
    """Two NCHW images: smooth random structure plus noise."""
    low = torch.randn(2, 3, 4, 4)
    return 2.0 * torch.nn.functional.interpolate(low, size=hw, mode="bilinear") + \
        0.5 * torch.randn(2, 3, *hw)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Fan-in scaled weights, norm scales around 1, random biases and BN statistics."""
    for name, p in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            p.normal_(0.0, 0.5)
        elif p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.2)
        else:
            p.normal_(0.0, 0.2)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.normal_(0.0, 0.2)
        elif name.endswith("running_var"):
            b.uniform_(0.5, 2.0)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    for name, hw, strides in (("tiny", (64, 64), ("depthwise", "expand")),
                              ("nonsquare", (64, 96), ("depthwise",))):
        model = timm_model(hw)
        randomize(model)
        sd = model.state_dict()
        out = {"config": np.array(json.dumps(SIZES))}
        out.update({f"sd/{k}": v.numpy() for k, v in sd.items()})
        for stride_at in strides:
            variant = timm_model(hw, stride_at)
            variant.load_state_dict(sd)
            x = image(hw)
            out[f"{stride_at}/input"] = x.permute(0, 2, 3, 1).numpy()
            out[f"{stride_at}/logits"] = variant(x).numpy()
        save(f"coatnet_{name}.npz", out)

    out = {}
    for case, (old, new, pass_old) in RESIZES.items():
        table = torch.randn((2 * old[0] - 1) * (2 * old[1] - 1), HEADS)
        new_shape = ((2 * new[0] - 1) * (2 * new[1] - 1), HEADS)
        resized = resize_rel_pos_bias_table(
            table, new_window_size=new, new_bias_shape=new_shape,
            old_window_size=old if pass_old else None,
        )
        # Stored in our [2H-1, 2W-1, heads] layout.
        out[f"{case}/table"] = table.reshape(2 * old[0] - 1, 2 * old[1] - 1, HEADS).numpy()
        out[f"{case}/resized"] = resized.reshape(2 * new[0] - 1, 2 * new[1] - 1, HEADS).numpy()
        out[f"{case}/new_hw"] = np.array(new)
    save("coatnet_resize.npz", out)


def save(name: str, arrays: dict) -> None:
    path = OUT / name
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
