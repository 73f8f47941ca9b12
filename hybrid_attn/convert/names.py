"""The one table of importable timm models: our name -> timm architecture, the model we
build for it, its overrides, and the converter that maps its tensors.

What timm itself says about each architecture (parameter count, classifier name, the
preprocessing of each set of trained weights, every tensor's shape) is read from timm once
by ``tests/goldens/generate_timm_reference.py`` into ``timm_reference.json.gz`` beside this
file, so importing needs neither torch nor timm nor the network.

A new architecture plugs in with one row here plus its converter: a module
``hybrid_attn.convert.<converter>`` with a function

    convert(state_dict: Mapping[str, np.ndarray], model: nn.Module,
            image_shape: Sequence[int] | None = None) -> dict

returning the model's variables (``{"params": ..., "batch_stats": ...}``) and raising
ValueError for tensors it lacks or does not use (see ``common.TrackedStateDict``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import pathlib
from collections.abc import Mapping
from typing import Any

REFERENCE_FILE = pathlib.Path(__file__).with_name("timm_reference.json.gz")


@dataclasses.dataclass(frozen=True)
class TimmImport:
    """One importable timm architecture.

    Attributes:
      name: our name for the imported variant (named after its source, see DESIGN.md).
      timm: timm's architecture name (without a ``.tag``).
      model: the registered model we build (``hybrid_attn.models.get_model``).
      converter: module under ``hybrid_attn.convert`` whose ``convert`` maps the tensors.
      overrides: fields of ``model`` that differ from its defaults for these weights.
    """

    name: str
    timm: str
    model: str
    converter: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_TWINS = {"small": "s", "base": "b", "large": "l"}

TIMM_MODELS: tuple[TimmImport, ...] = (
    # timm's resnet26 is (2, 2, 2, 2) blocks; our resnet26 is SASA's (1, 2, 4, 1).
    TimmImport("resnet26_timm", "resnet26", "resnet26", "timm_resnet",
               {"stage_sizes": (2, 2, 2, 2)}),
    TimmImport("resnet50", "resnet50", "resnet50", "timm_resnet"),
    TimmImport("resnet101", "resnet101", "resnet101", "timm_resnet"),
    TimmImport("resnet152", "resnet152", "resnet152", "timm_resnet"),
    # Paper-style CoAtNets: timm builds them but publishes no trained weights.
    *(TimmImport(f"coatnet_{i}", f"coatnet_{i}_224", f"coatnet_{i}", "timm_coatnet")
      for i in range(5)),
    # timm's own ("rw") CoAtNets, its trained ones (models/coatnet_rw.py); the 384 weights
    # are coatnet_rmlp_2_rw's architecture fine-tuned at 384.
    *(TimmImport(name, f"{name}_224", name, "timm_coatnet") for name in (
        "coatnet_nano_rw", "coatnet_0_rw", "coatnet_1_rw", "coatnet_2_rw", "coatnet_3_rw",
        "coatnet_bn_0_rw", "coatnet_rmlp_nano_rw", "coatnet_rmlp_1_rw", "coatnet_rmlp_1_rw2",
        "coatnet_rmlp_2_rw", "coatnext_nano_rw")),
    TimmImport("coatnet_rmlp_2_rw_384", "coatnet_rmlp_2_rw_384", "coatnet_rmlp_2_rw_384",
               "timm_coatnet"),
    # The published LSA zero-token padding, for weight parity (identical at 224).
    *(TimmImport(f"twins_{kind}_{_TWINS[size]}", f"twins_{kind}_{size}",
                 f"twins_{kind}_{_TWINS[size]}", "timm_twins",
                 {"lsa_mask_padding": False} if kind == "svt" else {})
      for kind in ("pcpvt", "svt") for size in ("small", "base", "large")),
    # timm's BoTNets and HaloNets (models/byoanet.py); preprocessing from the reference.
    *(TimmImport(ours, theirs, ours, "timm_byoanet") for ours, theirs in (
        ("botnet26t", "botnet26t_256"), ("sebotnet33ts", "sebotnet33ts_256"),
        ("eca_botnext26ts", "eca_botnext26ts_256"), ("halonet26t", "halonet26t"),
        ("sehalonet33ts", "sehalonet33ts"), ("halonet50ts", "halonet50ts"),
        ("eca_halonext26ts", "eca_halonext26ts"), ("halo2botnet50ts", "halo2botnet50ts_256"))),
)


@functools.cache
def reference() -> dict[str, dict]:
    """timm's facts per architecture (see ``tests/goldens/generate_timm_reference.py``)."""
    return json.loads(gzip.decompress(REFERENCE_FILE.read_bytes()))


def supported() -> list[str]:
    """The timm architecture names that import today, sorted."""
    return sorted(entry.timm for entry in TIMM_MODELS)


def lookup(timm_name: str) -> tuple[TimmImport, str]:
    """The table row and the weight tag for ``timm_name`` (``arch`` or ``arch.tag``; no tag
    means timm's default weights for the architecture).

    Raises:
      ValueError: for an architecture not in the table or a tag timm does not publish,
        listing the valid ones.
    """
    arch, _, tag = timm_name.partition(".")
    rows = {entry.timm: entry for entry in TIMM_MODELS}
    if arch not in rows:
        raise ValueError(f"No importer for timm model {arch!r}. Supported timm "
                         f"architectures: {', '.join(supported())}")
    facts = reference()[arch]
    tag = tag or facts["default_tag"]
    if tag not in facts["pretrained"]:
        raise ValueError(f"timm publishes no weights {arch}.{tag}; its tags: "
                         f"{', '.join(facts['pretrained'])}")
    return rows[arch], tag


def preprocessing(arch: str, tag: str) -> dict[str, Any]:
    """timm's evaluation preprocessing for weights ``arch.tag``: ``input_size`` (C, H, W),
    ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``num_classes``."""
    return dict(reference()[arch]["pretrained"][tag])
