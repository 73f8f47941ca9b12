"""Optimizer and learning-rate schedule from the config, built with optax."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Typed view of ``config.optim``; these defaults are the config's (``config_lib``)."""

    name: str = "adamw"  # adamw | sgd
    learning_rate: float = 1e-3  # peak, for the config's global batch_size
    end_learning_rate: float = 1e-5
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_epochs: float = -1.0  # > 0 overrides warmup_steps (resolved by from_config)
    weight_decay: float = 0.05  # decoupled; which leaves decay: see decay_mask
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    grad_clip_norm: float = 1.0  # <= 0 disables
    ema_decay: float = 0.0  # > 0 keeps an EMA of the parameters, used for evaluation
    # AdamW only: the global-norm clip and Adam's moments on one flat vector of all
    # parameters (optax.flatten) instead of per leaf; the same arithmetic in a few large
    # kernels rather than hundreds of small ones, which compiles and steps faster on
    # XLA:CPU (README, Speed). The moments are then one 1-D array each, placed by the
    # sharding rule for their path (``opt_state/0/...``) as a whole: keep it off with FSDP.
    flat_state: bool = False

    def __post_init__(self) -> None:
        checks = {
            "name adamw or sgd": self.name in ("adamw", "sgd"),
            "schedule cosine, linear or constant": self.schedule in (
                "cosine", "linear", "constant"),
            "learning_rate > 0": self.learning_rate > 0,
            "end_learning_rate >= 0": self.end_learning_rate >= 0,
            "warmup_steps >= 0": self.warmup_steps >= 0,
            "weight_decay >= 0": self.weight_decay >= 0,
            "0 <= b1 < 1": 0 <= self.b1 < 1,
            "0 <= b2 < 1": 0 <= self.b2 < 1,
            "eps > 0": self.eps > 0,
            "0 <= momentum < 1": 0 <= self.momentum < 1,
            "0 <= ema_decay < 1": 0 <= self.ema_decay < 1,
            "flat_state only with name adamw": not self.flat_state or self.name == "adamw",
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"Invalid optim config: need {'; '.join(failed)} (got {self})")

    @classmethod
    def from_config(cls, c: Mapping[str, Any], steps_per_epoch: int) -> OptimConfig:
        """From ``config.optim``, ``warmup_epochs`` (when > 0) turned into
        ``warmup_steps``; unknown keys and invalid values raise ValueError."""
        values = c.to_dict() if hasattr(c, "to_dict") else dict(c)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"Unknown optim config keys {unknown}; valid: {sorted(fields)}")
        if values.get("warmup_epochs", -1.0) > 0:
            values["warmup_steps"] = int(round(values["warmup_epochs"] * steps_per_epoch))
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


# The weight-decay rule, declared once: matrices and kernels (ndim >= 2) decay; vectors
# (norm scales, biases) and every leaf under a scope named in NO_DECAY_SCOPES do not.
# ``position`` is where every attention position term lives (``.../attn/position/...``:
# relative bias tables, relative-logit and absolute embeddings), so tables never decay.
NO_DECAY_SCOPES = frozenset({"position"})


def decays(path: tuple, leaf: Any) -> bool:
    """Whether the parameter at ``path`` (a jax key path) is weight-decayed."""
    scopes = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return leaf.ndim >= 2 and not scopes & NO_DECAY_SCOPES


def decay_mask(params: Any) -> Any:
    """The :func:`decays` rule over a parameter tree (optax's ``mask``)."""
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW or SGD (Nesterov) with masked decoupled weight decay.

    With ``flat_state`` (AdamW only) the per-element work, the global-norm clip and the
    moments, runs under ``optax.flatten`` on one vector of all parameters, while the decay
    mask and the learning rate still apply per parameter: the same update as
    ``optax.adamw(schedule, ..., mask=decay_mask)`` after ``clip_by_global_norm``, built
    from the parts optax composes ``adamw`` of.
    """
    clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    if cfg.flat_state:
        return optax.chain(
            optax.flatten(optax.chain(*clip, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2,
                                                                 eps=cfg.eps))),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    parts = list(clip)
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    else:
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
    return optax.chain(*parts)
