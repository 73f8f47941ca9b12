"""``from_timm``: a timm state dict -> our model and its variables, for every architecture
of the table in :mod:`hybrid_attn.convert.names`; plus the metadata an imported checkpoint
records (model, timm weights, class count, timm's preprocessing) and the model rebuilt
from it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_attn.convert import common, names
from hybrid_attn.models import get_model


@dataclasses.dataclass(frozen=True)
class Imported:
    """A converted model: the module, its variables and the metadata to record with them."""

    model: nn.Module
    variables: dict
    meta: dict[str, Any]


def check_against_timm(state_dict: Mapping, arch: str) -> None:
    """Raises ValueError naming the first tensor (in timm's order) that timm's ``arch``
    has and ``state_dict`` lacks or holds in another shape, or else the first tensor timm's
    ``arch`` does not have. The classifier may have any number of classes."""
    facts = names.reference()[arch]
    expected = {k: tuple(v) for k, v in facts["shapes"].items()
                if not k.endswith(common.IGNORED_SUFFIXES)}
    classifier = facts["classifier"] + "."
    for key, shape in expected.items():
        if key not in state_dict:
            raise ValueError(f"The checkpoint is not timm's {arch}: it lacks {key} "
                             f"(shape {shape} in {arch})")
        got = tuple(np.shape(state_dict[key]))
        same = got[1:] == shape[1:] if key.startswith(classifier) else got == shape
        if not same:
            raise ValueError(f"The checkpoint is not timm's {arch}: first mismatching tensor "
                             f"{key} has shape {got} in the checkpoint, {shape} in {arch}")
    extra = [k for k in state_dict if k not in expected and not k.endswith(
        common.IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"The checkpoint is not timm's {arch}: {len(extra)} tensors {arch} "
                         f"does not have, the first {extra[0]} "
                         f"(shape {tuple(np.shape(state_dict[extra[0]]))})")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def model_from_meta(meta: Mapping[str, Any], **overrides) -> nn.Module:
    """The model an imported checkpoint's ``meta`` describes (JSON lists back to tuples);
    ``overrides`` (e.g. ``num_classes``, ``dtype``) replace recorded fields."""
    fields = {k: tuple(v) if isinstance(v, list) else v
              for k, v in meta.get("model_overrides", {}).items()}
    fields["num_classes"] = meta["num_classes"]
    return get_model(meta["model_name"], **{**fields, **overrides})


def import_timm(timm_name: str, state_dict: Mapping, **model_overrides) -> Imported:
    """Converts ``state_dict`` (numpy arrays) of timm's ``timm_name`` (``arch`` or
    ``arch.tag``); see :func:`from_timm`. The class count is read from the classifier."""
    entry, tag = names.lookup(timm_name)
    facts = names.reference()[entry.timm]
    if not model_overrides:
        check_against_timm(state_dict, entry.timm)
    classifier = f"{facts['classifier']}.weight"
    if classifier not in state_dict:
        raise ValueError(f"The checkpoint is not timm's {entry.timm}: it lacks its "
                         f"classifier {classifier}")
    prep = names.preprocessing(entry.timm, tag)
    meta = {
        "model_name": entry.model,
        "import_name": entry.name,
        "timm_name": f"{entry.timm}.{tag}",
        "num_classes": int(np.shape(state_dict[classifier])[0]),
        "model_overrides": {k: _jsonable(v)
                            for k, v in {**entry.overrides, **model_overrides}.items()},
        "preprocessing": {k: _jsonable(v) for k, v in prep.items() if k != "num_classes"},
    }
    model = model_from_meta(meta)
    image_shape = (1, *prep["input_size"][1:], 3)
    converter = importlib.import_module(f"hybrid_attn.convert.{entry.converter}")
    try:
        variables = converter.convert(state_dict, model, image_shape=image_shape)
    except KeyError as e:
        raise ValueError(f"The checkpoint lacks tensor {e.args[0]!r}, which {entry.name} "
                         "needs") from None
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))
    common.check_shapes(variables, shapes)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(variables.get("params", {})))
    meta["summary"] = (f"{num_params / 1e6:.2f}M parameters, {meta['num_classes']} classes, "
                       f"{image_shape[1]}px, from timm {meta['timm_name']}")
    return Imported(model, variables, meta)


def from_timm(timm_name: str, state_dict: Mapping, **model_overrides) -> tuple[nn.Module, dict]:
    """Our model and variables for timm's ``timm_name`` (e.g. ``"resnet50.a1_in1k"``; a
    ``.tag`` picks the preprocessing recorded for those weights, none means timm's default
    weights) from its ``state_dict`` (a mapping of numpy arrays); then
    ``model.apply(variables, images_nhwc, train=False)`` gives timm's eval-mode logits.

    Full-size checkpoints are first checked tensor by tensor against timm's shapes;
    ``model_overrides`` (e.g. reduced widths for tests) skip that check and replace fields
    of the model, whose converted variables are still checked against it.

    Raises:
      ValueError: an unknown timm name (listing the supported ones) or a checkpoint that
        does not fit (naming the first mismatching tensor and both shapes).
    """
    imported = import_timm(timm_name, state_dict, **model_overrides)
    return imported.model, imported.variables


def recorded_eval_input(input_cfg: Any, meta: Mapping[str, Any]) -> Any:
    """``input_cfg`` (an ``input_pipeline.InputConfig``) with the evaluation preprocessing
    an imported checkpoint records: timm's input size, crop fraction, mean and std for its
    weights. The pipeline resizes bicubically; other recorded interpolations are logged."""
    from absl import logging

    prep = meta["preprocessing"]
    if prep["interpolation"] != "bicubic":
        logging.warning("timm evaluates %s with %s resizing; the input pipeline resizes "
                        "bicubically.", meta.get("timm_name"), prep["interpolation"])
    return dataclasses.replace(input_cfg, image_size=int(prep["input_size"][1]),
                               crop_pct=float(prep["crop_pct"]), mean=tuple(prep["mean"]),
                               std=tuple(prep["std"]))
