"""Writes the timm golden files for tests/test_botnet.py and tests/test_resnet.py.

Run with the timm venv (the project itself never imports torch):

    /tmp/timm-venv/bin/python tests/goldens/generate_botnet.py

Each .npz holds a reduced-size timm model's state dict (``sd/<torch name>``), an NCHW-free
NHWC input ``x`` and timm's output ``y``, all float32. Weights and BatchNorm running
statistics are random (fixed seed) so that a mapping or layout mistake cannot hide behind
identity-initialised layers. Files:

* ``botnet_block_s1.npz``: timm ``SelfAttnBlock`` + ``BottleneckAttn`` (4 heads), stride 1,
  on a 5x7 map, timm's default ``scale_pos_embed=False``.
* ``botnet_block_s2.npz``: the same with stride 2 (attention then 2x2 average pool) on a
  6x8 map, with ``scale_pos_embed=True`` (the authors' scaling).
* ``botnet_tiny.npz``: a ByobNet laid out like BoTNet-50 (7x7 stem + max pool, ReLU,
  c5 = BoT blocks with the strided first one), widths 8..64, on a 64x96 input.
* ``botnet_s1_tiny.npz``: the BoTNet-S1 layout (SiLU, unstrided c5, SE after the last BN
  of the convolutional blocks), same widths, on a 64x96 input.
* ``resnet_tiny.npz``: timm ``ResNet`` (Bottleneck, blocks 2,1,1,1, widths 8..64).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, LayerFn, SelfAttnBlock
from timm.models.resnet import Bottleneck, ResNet

OUT = os.path.dirname(os.path.abspath(__file__))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights (std 1/sqrt(fan-in), so activations stay O(1)), BatchNorm scales
    around 1 and random running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (fan_in**-0.5 if p.ndim > 1 else 0.2))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(1.0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    model.eval()


def save(name: str, model: torch.nn.Module, x_nhwc: np.ndarray) -> None:
    with torch.no_grad():
        y = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()
    if y.ndim == 4:
        y = y.transpose(0, 2, 3, 1)
    sd = {f"sd/{k}": v.numpy().astype(np.float32)
          for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = os.path.join(OUT, name)
    np.savez_compressed(path, x=x_nhwc, y=y.astype(np.float32), **sd)
    print(f"{name}: {os.path.getsize(path) / 1024:.0f} KiB, output {y.shape}")


def block(stride: int, feat: tuple[int, int], scale_pos_embed: bool, seed: int) -> None:
    layers = LayerFn(self_attn=functools.partial(BottleneckAttn, num_heads=4,
                                                 scale_pos_embed=scale_pos_embed))
    m = SelfAttnBlock(32, 64, stride=stride, bottle_ratio=0.25, downsample="conv1x1",
                      feat_size=feat, layers=layers)
    randomize(m, seed)
    x = np.random.default_rng(seed).standard_normal((2, *feat, 32)).astype(np.float32)
    save(f"botnet_block_s{stride}.npz", m, x)


def byobnet(name: str, s1: bool, seed: int) -> None:
    conv_kw = dict(block_kwargs=dict(attn_last=True)) if s1 else {}
    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg("bottle", d=1, c=32, s=1, br=0.25, **conv_kw),
            ByoBlockCfg("bottle", d=1, c=64, s=2, br=0.25, **conv_kw),
            ByoBlockCfg("bottle", d=2, c=128, s=2, br=0.25, **conv_kw),
            ByoBlockCfg("self_attn", d=2, c=256, s=1 if s1 else 2, br=0.25),
        ),
        downsample="conv1x1", stem_chs=8, stem_type="7x7", stem_pool="maxpool",
        act_layer="silu" if s1 else "relu",
        attn_layer="se" if s1 else None, attn_kwargs=dict(rd_ratio=1 / 16, rd_divisor=1),
        self_attn_layer="bottleneck", self_attn_kwargs=dict(scale_pos_embed=s1),
        fixed_input_size=True,
    )
    m = ByobNet(cfg, num_classes=5, img_size=(64, 96))
    randomize(m, seed)
    x = np.random.default_rng(seed).standard_normal((2, 64, 96, 3)).astype(np.float32)
    save(name, m, x)


def resnet(seed: int) -> None:
    m = ResNet(Bottleneck, [2, 1, 1, 1], num_classes=5, channels=(8, 16, 32, 64))
    randomize(m, seed)
    x = np.random.default_rng(seed).standard_normal((2, 40, 56, 3)).astype(np.float32)
    save("resnet_tiny.npz", m, x)


if __name__ == "__main__":
    torch.manual_seed(0)
    block(1, (5, 7), scale_pos_embed=False, seed=1)
    block(2, (6, 8), scale_pos_embed=True, seed=2)
    byobnet("botnet_tiny.npz", s1=False, seed=3)
    byobnet("botnet_s1_tiny.npz", s1=True, seed=4)
    resnet(seed=5)
