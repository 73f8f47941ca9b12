"""The model an experiment config names, built next to the registry so that the trainer,
the evaluator and notebooks share it without importing one another."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hybrid_attn.models import get_model

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """``config.model_name`` with the ``config.model`` overrides, ``config.data``'s class
    count and ``config.compute_dtype`` (parameters stay float32)."""
    if config["compute_dtype"] not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, "
                         f"got {config['compute_dtype']!r}")
    model = config["model"]
    return get_model(
        config["model_name"],
        num_classes=config["data"]["num_classes"],
        dtype=COMPUTE_DTYPES[config["compute_dtype"]],
        **(model.to_dict() if hasattr(model, "to_dict") else dict(model)),
    )
