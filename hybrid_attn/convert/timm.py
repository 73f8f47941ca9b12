"""Map timm (PyTorch) state dicts onto our variables.

Usage (torch is only needed to read the checkpoint file, never by the project itself)::

    state_dict = {k: v.numpy() for k, v in torch.load(path).items()}
    variables = convert_timm("coatnet_0", state_dict, model, image_shape=(1, 224, 224, 3))

Each family has its own mapping module (``timm_<family>.py``) exposing
``convert(state_dict, model, image_shape=None) -> variables``; this file dispatches on
the model name and checks every converted leaf against the model's own shapes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_attn.convert.common import check_shapes

_FAMILY_PREFIXES = {
    "coatnet": "coatnet",
    "resnet": "resnet",
    "botnet": "botnet",
    "twins": "twins",
}


def _family(model_name: str) -> str:
    for prefix, family in _FAMILY_PREFIXES.items():
        if model_name.startswith(prefix):
            return family
    raise ValueError(
        f"No timm converter for {model_name!r}; families covered: {sorted(_FAMILY_PREFIXES)}"
    )


def convert_timm(
    model_name: str,
    state_dict: Mapping,
    model: nn.Module,
    image_shape: tuple[int, int, int, int] = (1, 224, 224, 3),
) -> dict:
    """Converts a timm state dict for ``model`` (a module of family ``model_name``).

    ``image_shape`` is the NHWC input shape the weights will be used at; it sizes the
    reference variables the converted tree is checked against.
    """
    family = _family(model_name)
    mapping = importlib.import_module(f"hybrid_attn.convert.timm_{family}")
    variables = mapping.convert(state_dict, model, image_shape=image_shape)
    reference = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False)
    )
    check_shapes(variables, reference)
    return jax.tree_util.tree_map(jnp.asarray, variables)
