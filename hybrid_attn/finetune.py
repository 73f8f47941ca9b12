"""Starting a run from pretrained weights (``config.init_checkpoint``): a checkpoint of the
trainer or one imported by ``python -m hybrid_attn.convert``, possibly made for another
class count and another resolution.

The classifier (``params/head``, the name every model gives its last Dense layer) keeps
the run's freshly initialised weights when its class count differs, and says so in the
log; position tables are resized for the run's input (``resize_position_tables``); any
other difference is an error naming the variable. :func:`pretrained_config` turns an
imported checkpoint into the model and normalisation of a fine-tuning config.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from hybrid_attn import checkpoint
from hybrid_attn.models import resize_position_tables

HEAD = "head"


def read_meta(path: str) -> dict[str, Any]:
    """The metadata stored with the checkpoint ``<workdir>/checkpoints/<step>`` (model
    name; for imported weights also their model fields, class count and preprocessing),
    without reading its arrays."""
    step_dir = checkpoint.resolve(path.rstrip("/"))
    if not step_dir.name.isdigit() or not (step_dir / checkpoint.META).exists():
        raise FileNotFoundError(f"No checkpoint metadata at {step_dir} (expected a "
                                f"<workdir>/checkpoints/<step> directory with {checkpoint.META}/)")
    with ocp.CheckpointManager(
        step_dir.parent, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={checkpoint.META: ocp.JsonCheckpointHandler()},
    ) as manager:
        restored = manager.restore(int(step_dir.name), args=ocp.args.Composite(
            **{checkpoint.META: ocp.args.JsonRestore()}))
    return dict(restored[checkpoint.META] or {})


def pretrained_config(init_checkpoint: str) -> ml_collections.ConfigDict:
    """The config defaults for starting from the imported checkpoint ``init_checkpoint``:
    its model (name and recorded fields), the mean/std its weights were trained with, and
    ``init_checkpoint``; a fine-tuning recipe writes its data and optimiser on top."""
    from hybrid_attn import config_lib

    meta = read_meta(init_checkpoint)
    if "model_overrides" not in meta or "preprocessing" not in meta:
        raise ValueError(f"{init_checkpoint} was not written by python -m hybrid_attn.convert "
                         "(it records no model fields and preprocessing)")
    c = config_lib.defaults(meta["model_name"])
    c.model = ml_collections.ConfigDict({k: tuple(v) if isinstance(v, list) else v
                                         for k, v in meta["model_overrides"].items()})
    c.data.mean = tuple(meta["preprocessing"]["mean"])
    c.data.std = tuple(meta["preprocessing"]["std"])
    c.init_checkpoint = init_checkpoint
    return c


def _new_head(params: dict, fresh: dict, path: str) -> dict:
    """``params`` with the fresh classifier when the class counts differ (logged)."""
    if HEAD not in params or HEAD not in fresh:
        return params
    old = np.shape(params[HEAD]["kernel"])[-1]
    new = np.shape(fresh[HEAD]["kernel"])[-1]
    if old == new:
        return params
    logging.warning("init_checkpoint %s has a %d-class classifier and this run has %d "
                    "classes: starting from a newly initialised head (params/%s).",
                    path, old, new, HEAD)
    return {**params, HEAD: fresh[HEAD]}


def load_pretrained(
    path: str, target: dict[str, Any], model: nn.Module, image_shape: tuple[int, ...]
) -> tuple[dict[str, Any], str]:
    """The weights of checkpoint ``path`` fitted to ``target`` (this run's freshly
    initialised ``{"params", "batch_stats"}``, whose dtypes and shardings they take) for
    ``model`` at ``image_shape``, and which weights they are ("EMA weights" or "weights").

    Raises:
      checkpoint.CheckpointMismatchError: the checkpoint holds another model's variables.
      ValueError: a variable other than the head or a position table differs in shape.
    """
    loaded = checkpoint.load_variables(path)
    source = loaded["ema"] or {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}
    params = _new_head(dict(source["params"]), target["params"], path)
    weights = {
        "params": resize_position_tables(params, model, image_shape),
        "batch_stats": source["batch_stats"],
    }
    if jax.tree_util.tree_structure(weights) != jax.tree_util.tree_structure(target):
        raise checkpoint.CheckpointMismatchError(
            f"init_checkpoint {path} holds the variables of "
            f"{loaded['meta'].get('model_name', 'another model')}, not of this run's model")
    weights = jax.tree_util.tree_map(
        lambda new, old: jax.device_put(jnp.asarray(old, new.dtype), new.sharding),
        target, weights,
    )
    return weights, "EMA weights" if loaded["ema"] else "weights"
