"""Resizing learned position tables for a new input resolution, for every family.

Tables sized from the feature map (CoAtNet's relative bias, BoTNet's relative/absolute
logits) change shape with the input resolution; weights trained at one resolution are
resampled before use at another (e.g. 224 -> 384 fine-tuning). The target sizes come from
``jax.eval_shape`` of the model at the new input, so each block gets its own map size and
no compute is spent. Each table is resampled as the
:class:`~hybrid_attn.models.layers.position.PositionTable` subclass that owns it declares
(its ``resize`` classmethod); the owner of every parameter is found by recording which
module class runs at which path during that ``eval_shape``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from hybrid_attn.models.layers.position import PositionTable


def _shapes_and_owners(
    model: nn.Module, input_shape: Sequence[int]
) -> tuple[dict, dict[tuple[str, ...], type[nn.Module]]]:
    """The model's params (shapes only) at ``input_shape`` and ``{module path: class}``."""
    owners: dict[tuple[str, ...], type[nn.Module]] = {}

    def record(next_fun, args, kwargs, context):
        owners[tuple(context.module.path)] = type(context.module)
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False)

    return jax.eval_shape(init)["params"], owners


def resize_position_tables(
    params: Mapping, model: nn.Module, input_shape: Sequence[int]
) -> dict:
    """Returns ``params`` with every position table resized for ``model`` at the NHWC
    ``input_shape`` (e.g. ``(1, 384, 384, 3)``); leaves that already fit are unchanged.

    Raises:
      ValueError: if a leaf that is not a position table does not fit the model.
    """
    target, owners = _shapes_and_owners(model, input_shape)
    target_flat = traverse_util.flatten_dict(target)
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if path not in target_flat or tuple(leaf.shape) == tuple(target_flat[path].shape):
            continue
        shape = tuple(target_flat[path].shape)
        owner = owners.get(path[:-1])
        if owner is None or not issubclass(owner, PositionTable):
            raise ValueError(
                f"params/{'/'.join(path)} has shape {tuple(leaf.shape)} but the model at this "
                f"input needs {shape}, and it is not a position table that can be resized"
            )
        flat[path] = owner.resize(path[-1], leaf, shape)
    return traverse_util.unflatten_dict(flat)
