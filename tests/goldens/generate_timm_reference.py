"""Writes hybrid_attn/convert/timm_reference.json.gz: what timm says about every
architecture the importer covers or will cover, so importing needs neither torch nor timm.

Run with the timm venv (the project itself never imports torch)::

    /work/timm-venv/bin/python tests/goldens/generate_timm_reference.py

Per timm architecture: ``params`` (timm's parameter count at its default class count),
``classifier`` (the classifier module's state-dict prefix, from ``pretrained_cfg``),
``default_tag``, ``pretrained`` (per weight tag: ``input_size``, ``mean``, ``std``,
``interpolation``, ``crop_pct``, ``crop_mode``, ``num_classes``; architectures without
trained weights get their default configuration under the tag ``untrained``), and
``shapes`` (every state-dict tensor, in timm's order, with its shape). The model is built
on torch's meta device, so no weights are allocated.
"""

from __future__ import annotations

import gzip
import json
import pathlib

import timm
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "hybrid_attn" / "convert" / \
    "timm_reference.json.gz"

# Architectures with trained weights (timm.list_models(pattern, pretrained=True)), the
# issue's families plus the ResNets, and the paper-style CoAtNets timm builds untrained.
PRETRAINED_PATTERNS = (
    "coatnet_*_rw_*", "coatnet_bn_*", "coatnet_rmlp_*", "coatnext_*",
    "botnet26t_256", "sebotnet33ts_256", "eca_botnext26ts_256",
    "halonet*", "sehalonet*", "eca_halonext*", "halo2botnet*",
    "twins_*", "resnet26", "resnet50", "resnet101", "resnet152",
)
UNTRAINED = tuple(f"coatnet_{i}_224" for i in range(5))
PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode",
                 "num_classes")


def tags_by_architecture() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in UNTRAINED}
    for pattern in PRETRAINED_PATTERNS:
        for full in timm.list_models(pattern, pretrained=True):
            arch, tag = full.split(".", 1)
            found.setdefault(arch, []).append(tag)
    return found


def describe(arch: str, tags: list[str]) -> dict:
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    default = timm.models.get_pretrained_cfg(arch)
    pretrained = {}
    for tag in tags or [default.tag]:
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}").to_dict()
        pretrained[tag] = {k: cfg[k] for k in PREPROCESSING}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "classifier": default.classifier,
        "default_tag": default.tag,
        "pretrained": pretrained,
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def main() -> None:
    reference = {arch: describe(arch, tags)
                 for arch, tags in sorted(tags_by_architecture().items())}
    OUT.write_bytes(gzip.compress(json.dumps(reference, sort_keys=False).encode(), mtime=0))
    print(f"wrote {OUT} ({len(reference)} architectures, {OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
