"""Resizing learned position tables for a new input resolution, for every family.

Tables sized from the feature map (CoAtNet's relative bias, BoTNet's relative/absolute
logits) change shape with the input resolution; weights trained at one resolution are
resampled before use at another (e.g. 224 -> 384 fine-tuning). The target sizes come from
``jax.eval_shape`` of the model at the new input, so each block gets its own map size and
no compute is spent. Each table kind is resampled by its own layer's function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from hybrid_attn.models.layers import relative_bias, relative_logits


def _resize_leaf(path: tuple[str, ...], leaf, target_shape: tuple[int, ...]):
    name = path[-1]
    if name == relative_bias.TABLE_NAME:
        rows, cols, _ = target_shape
        return relative_bias.resize_relative_bias(leaf, ((rows + 1) // 2, (cols + 1) // 2))
    if name in relative_logits.TABLE_NAMES:
        return relative_logits.resize_table(leaf, target_shape[0])
    raise ValueError(
        f"params/{'/'.join(path)} has shape {tuple(leaf.shape)} but the model at this input "
        f"needs {target_shape}, and it is not a position table that can be resized"
    )


def resize_position_tables(
    params: Mapping, model: nn.Module, input_shape: Sequence[int]
) -> dict:
    """Returns ``params`` with every position table resized for ``model`` at the NHWC
    ``input_shape`` (e.g. ``(1, 384, 384, 3)``); leaves that already fit are unchanged.

    Raises:
      ValueError: if a leaf that is not a position table does not fit the model.
    """
    target = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False)
    )["params"]
    target_flat = traverse_util.flatten_dict(target)
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if path in target_flat and tuple(leaf.shape) != tuple(target_flat[path].shape):
            flat[path] = _resize_leaf(path, leaf, tuple(target_flat[path].shape))
    return traverse_util.unflatten_dict(flat)
