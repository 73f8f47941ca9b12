"""Model registry: NAME -> constructor.

Every model is a ``flax.linen.Module`` called as ``module.apply(variables, images,
train=False)`` on NHWC float images and returning logits; ``module.init(rng, images,
train=False)`` creates ``params`` (and ``batch_stats`` for models with BatchNorm).
Constructors are named partials of one class per family, imported lazily so that using
one family does not import the others.
"""

from __future__ import annotations

import importlib

import flax.linen as nn

from hybrid_attn.models.position_tables import resize_position_tables

_FAMILIES: dict[str, tuple[str, ...]] = {
    "coatnet": tuple(f"coatnet_{i}" for i in range(5)),
    "coatnet_rw": ("coatnet_nano_rw", "coatnet_0_rw", "coatnet_1_rw", "coatnet_2_rw",
                   "coatnet_3_rw", "coatnet_bn_0_rw", "coatnet_rmlp_nano_rw", "coatnet_rmlp_1_rw",
                   "coatnet_rmlp_1_rw2", "coatnet_rmlp_2_rw", "coatnet_rmlp_2_rw_384",
                   "coatnext_nano_rw"),
    "resnet": ("resnet26", "resnet38", "resnet50", "resnet101", "resnet152"),
    "botnet": ("botnet50",) + tuple(f"botnet_s1_t{i}" for i in range(3, 8)),
    "sasa": tuple(f"sasa_resnet{d}{s}" for d in (26, 38, 50) for s in ("", "_convstem")),
    "twins": tuple(f"twins_{k}_{s}" for k in ("pcpvt", "svt") for s in ("s", "b", "l")),
    "byoanet": ("botnet26t", "sebotnet33ts", "eca_botnext26ts", "halonet26t", "sehalonet33ts",
                "halonet50ts", "eca_halonext26ts", "halo2botnet50ts"),
}
_REGISTRY: dict[str, str] = {
    name: family for family, names in _FAMILIES.items() for name in names
}


__all__ = ["get_model", "list_models", "resize_position_tables"]


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, **overrides) -> nn.Module:
    """Builds the named model; ``overrides`` replace fields of its size table.

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(list_models())}")
    module = importlib.import_module(f"hybrid_attn.models.{_REGISTRY[name]}")
    return getattr(module, name)(**overrides)
