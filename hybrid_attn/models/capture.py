"""Attention capture: every attention layer's softmax weights, as dense maps over the image.

Every :class:`~hybrid_attn.models.layers.attention.Attention` sows its float32 softmax
weights into the ``attention`` collection when that collection is mutable (never at init,
and at no cost otherwise)::

    from hybrid_attn.models import get_model
    from hybrid_attn.models.capture import attention_maps

    model = get_model("coatnet_0")
    maps = attention_maps(model, variables, images)   # images: NHWC float [B, H, W, 3]
    for m in maps:
        print(m.path, m.kind, m.query_hw, m.key_hw, m.key_stride, m.weights.shape)

:func:`attention_maps` returns one :class:`AttentionMap` per attention layer call, in the
order the layers ran. Its fields:

* ``path``: the module path, e.g. ``"stage3/block0/attn"``;
* ``kind``: ``"global"``, ``"blocked"`` (window / neighbourhood / haloed blocks) or
  ``"subsampled"`` (Twins' GSA);
* ``query_hw``: the query map ``(Hq, Wq)``; ``key_hw``: the key grid ``(Hk, Wk)`` and
  ``key_stride``: how many image pixels of the layer's input one key step covers (``(r, r)``
  for keys sub-sampled by r, else ``(1, 1)``);
* ``weights``: ``[B, heads, Hq, Wq, Hk, Wk]`` float32, the weight of every query on every
  key. Blocked layers' per-block weights are scattered back to image positions: a key
  outside a query's block, window or the image gets exactly 0, so each row sums to one,
  except for ``Blocked(padding="zero_kv")`` (timm's HaloNet), whose zero keys beyond the
  border take part in the softmax and are not image positions (their share is dropped).

The same data is available without the helper as ``model.apply(variables, images,
train=False, mutable=["attention"])[1]["attention"]``, nested by module path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax

from hybrid_attn.models.layers.attention import AttentionMap

__all__ = ["AttentionMap", "attention_maps"]


def _collect(tree, out: list[AttentionMap]) -> None:
    """The AttentionMaps of a sown collection, in insertion (= call) order."""
    if isinstance(tree, AttentionMap):
        out.append(tree)
    elif isinstance(tree, Mapping):
        for value in tree.values():
            _collect(value, out)
    elif isinstance(tree, tuple | list):
        for value in tree:
            _collect(value, out)


def attention_maps(model: nn.Module, variables: Mapping, images: jax.Array) -> list[AttentionMap]:
    """Runs ``model`` in eval mode on NHWC ``images`` and returns every attention layer's
    :class:`AttentionMap` (see the module docstring), in call order."""
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"attention_maps expects NHWC images, got shape "
                         f"{getattr(images, 'shape', None)}")
    maps: list[AttentionMap] = []
    _collect(_sown(model, variables, images).get("attention", {}), maps)
    return maps


@functools.partial(jax.jit, static_argnums=0)
def _sown(model: nn.Module, variables: Mapping, images: jax.Array) -> Mapping:
    """The eval-mode forward pass's ``attention`` collection; one compile per model and
    input shape (linen modules hash by their fields), reused by every later evaluation."""
    return model.apply(variables, images, train=False, mutable=["attention"])[1]
