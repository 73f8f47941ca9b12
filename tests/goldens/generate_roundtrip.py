"""Writes the round-trip goldens of test_convert_cli.py / test_predict.py / test_finetune.py.

Run with the timm venv (the project itself never imports torch)::

    /work/timm-venv/bin/python tests/goldens/generate_roundtrip.py

A reduced-size timm ``MaxxVit`` with the block configs of timm's paper-style
``coatnet_0_224`` (C-C-T-T, pre-logits head, 1000 classes) gets random weights (every
tensor redrawn, BatchNorm running statistics included) and is saved as timm would publish
it, ``roundtrip_coatnet.safetensors``. Two PNG photos-to-be (smooth random colour fields,
one landscape, one portrait) go through timm's own evaluation transform for
``coatnet_0_224``'s pretrained config (PIL resize of the shorter side to
``size / crop_pct`` with its interpolation, centre crop, mean/std), and
``roundtrip_coatnet.npz`` stores ``config`` (the reduced sizes, JSON), ``input`` (timm's
transformed NHWC images) and ``logits`` (timm, eval mode).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import timm
import torch
from generate_coatnet import randomize  # the same randomisation as the CoAtNet goldens
from PIL import Image
from safetensors.torch import save_file
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg

OUT = pathlib.Path(__file__).resolve().parent
ARCH = "coatnet_0_224"
SIZES = dict(depths=(1, 1, 1, 1), widths=(16, 16, 32, 48), stem_width=8, head_dim=16)
IMAGE_SIZES = {"roundtrip_landscape.png": (260, 230), "roundtrip_portrait.png": (180, 250)}


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field with some texture, as uint8 RGB."""
    low = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR), np.float32)
    noisy = smooth + rng.normal(0, 8, smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = timm.models.get_pretrained_cfg(ARCH)
    model = MaxxVit(MaxxVitCfg(
        embed_dim=SIZES["widths"], depths=SIZES["depths"], stem_width=SIZES["stem_width"],
        head_hidden_size=SIZES["widths"][-1],
        transformer_cfg=MaxxVitTransformerCfg(dim_head=SIZES["head_dim"]),
    ), img_size=cfg.input_size[1:], num_classes=cfg.num_classes).eval()
    randomize(model)
    save_file(model.state_dict(), OUT / "roundtrip_coatnet.safetensors")

    transform = timm.data.create_transform(
        input_size=cfg.input_size, interpolation=cfg.interpolation, mean=cfg.mean,
        std=cfg.std, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)
    inputs = []
    for name, (width, height) in IMAGE_SIZES.items():
        image = photo(width, height, rng)
        image.save(OUT / name)
        inputs.append(transform(Image.open(OUT / name).convert("RGB")))
    x = torch.stack(inputs)
    np.savez_compressed(OUT / "roundtrip_coatnet.npz", config=np.array(json.dumps(SIZES)),
                        input=x.permute(0, 2, 3, 1).numpy(), logits=model(x).numpy())
    for path in sorted(OUT.glob("roundtrip_*")):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
