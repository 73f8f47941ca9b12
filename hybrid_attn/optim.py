"""Optimizer and learning-rate schedule from the config, built with optax."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Typed view of ``config.optim`` (see ``config_lib.base_config`` for meanings)."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    end_learning_rate: float = 1e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = True
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.0

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict, steps_per_epoch: int) -> OptimConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = c.to_dict() if hasattr(c, "to_dict") else dict(c)
        unknown = sorted(set(values) - fields - {"warmup_epochs"})
        if unknown:
            raise ValueError(f"Unknown optim config keys {unknown}; valid: {sorted(fields)}")
        values = {k: v for k, v in values.items() if k in fields}
        if c.get("warmup_epochs", -1.0) > 0:
            values["warmup_steps"] = int(round(c.warmup_epochs * steps_per_epoch))
        if values["name"] not in ("adamw", "sgd"):
            raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {values['name']!r}")
        if values["schedule"] not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"optim.schedule must be cosine, linear or constant, got {values['schedule']!r}"
            )
        return cls(**values)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine/linear decay to ``end_learning_rate``."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            cfg.learning_rate, decay_steps, alpha=cfg.end_learning_rate / cfg.learning_rate
        )
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, cfg.end_learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup]
    )


def decay_mask(params: Any) -> Any:
    """True only for Dense/Conv ``kernel`` leaves: norms, biases and position tables
    (relative bias tables, relative/absolute embeddings) are not weight-decayed."""
    def is_kernel(path, leaf) -> bool:
        name = getattr(path[-1], "key", None)
        return name == "kernel" and leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW or SGD (Nesterov) with masked decoupled weight decay."""
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    else:
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
    return optax.chain(*parts)
