"""What the experiment configs under ``configs/`` share: argument parsing, the typed
defaults, and the digits quick start.

Every config file is ``get_config(arg)`` returning an ``ml_collections.ConfigDict``; the
text after the ``:`` in ``--config=configs/x.py:ARG`` is parsed by :func:`parse_arg`. A
file (with its family file ``configs/common_<family>.py``) writes its whole recipe
(optimiser, schedule, augmentation, regularisation, resolution) on top of
:func:`defaults`, which holds every key the trainer reads at the values of the typed
dataclasses below (:class:`TrainConfig`, ``InputConfig``, ``OptimConfig``,
``ShardingConfig``): each default is written once, there.

The trainer converts the ConfigDict into those typed values at its boundary (each
``from_config`` rejects unknown keys and invalid values with one line), so
``--config.x=...`` overrides are checked like the file's own values; modules never see a
ConfigDict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from hybrid_attn import optim, sharding
from hybrid_attn.data import input_pipeline

SECTIONS = ("data", "optim", "sharding")


class ConfigError(ValueError):
    """A config value or key the trainer cannot use; the message is one line."""


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses ``"digits,res=384"`` into a ConfigDict typed by ``spec``.

    A spec value is a default (its type types the argument) or a type such as ``int``:
    an optional argument that is None unless given. A bare key sets a boolean to True.
    Unknown keys and values of the wrong type raise ConfigError naming the valid keys, so
    a typo never silently runs the wrong experiment.
    """
    out = ml_collections.ConfigDict(
        {k: None if isinstance(v, type) else v for k, v in spec.items()})
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, sep, value = token.partition("=")
        if key not in spec:
            raise ConfigError(
                f"Unknown config argument {key!r} in {arg!r}; valid: {', '.join(sorted(spec))}"
            )
        kind = spec[key] if isinstance(spec[key], type) else type(spec[key])
        if not sep:
            if kind is not bool:
                raise ConfigError(f"Config argument {key!r} needs a value, e.g. {key}=N")
            out[key] = True
        elif kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"Config argument {key!r} expects true/false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError as e:
                raise ConfigError(
                    f"Config argument {key!r} expects {kind.__name__}, got {value!r}"
                ) from e
    return out


# The arguments every experiment file accepts (see apply_args).
STANDARD_ARGS = {"digits": False, "res": int, "batch": int, "epochs": float, "steps": int,
                 "bf16": False}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Typed view of the config's top level; the sections are ``data``
    (``InputConfig``), ``optim`` (``OptimConfig``) and ``sharding`` (``ShardingConfig``)."""

    model_name: str
    # Overrides passed to ``hybrid_attn.models.get_model`` (drop_path_rate, flags...).
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16" for mixed precision; parameters stay float32.
    batch_size: int = 4096  # global, over every device and process
    eval_batch_size: int = 1024
    num_epochs: float = 300.0
    num_train_steps: int = -1  # >= 1 trains this many steps instead of num_epochs; -1: epochs
    grad_accum_steps: int = 1  # > 1: average the gradients of this many microbatches per update
    log_every_steps: int = 100  # every period <= 0 disables its periodic action
    eval_every_steps: int = 5_000
    checkpoint_every_steps: int = 5_000
    keep_checkpoints: int = 3
    init_checkpoint: str = ""  # used only when the workdir holds no checkpoint
    profile: bool = False  # True: a clu Profile trace of 5 steps into the workdir (process 0)
    # > 0: each evaluation also writes attention-map images of this many eval images to
    # TensorBoard (hybrid_attn.evaluate.attention_images); 0 writes none.
    eval_attention_images: int = 0

    def __post_init__(self) -> None:
        checks = {
            "model_name set": bool(self.model_name),
            "batch_size >= 1": self.batch_size >= 1,
            "eval_batch_size >= 1": self.eval_batch_size >= 1,
            "num_epochs > 0": self.num_epochs > 0,
            "num_train_steps >= 1, or -1 to train num_epochs": (
                self.num_train_steps == -1 or self.num_train_steps >= 1),
            "grad_accum_steps >= 1": self.grad_accum_steps >= 1,
            "keep_checkpoints >= 1": self.keep_checkpoints >= 1,
            "eval_attention_images >= 0": self.eval_attention_images >= 0,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            got = ", ".join(f"{name}={getattr(self, name)!r}"
                            for name in dict.fromkeys(rule.split()[0] for rule in failed))
            raise ValueError(f"Invalid config: need {'; '.join(failed)} (got {got})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainConfig:
        """The top level of ``config`` (ConfigDict or mapping), its sections left out;
        unknown keys raise ValueError naming the valid ones."""
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(SECTIONS))
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; valid: {sorted(known)} and "
                             f"the sections {list(SECTIONS)}")
        return cls(**{k: v for k, v in values.items() if k in known})


def _section(value: Any) -> ml_collections.ConfigDict:
    """A dataclass instance as a ConfigDict; None fields become typed FieldReferences so
    ``--config.x=...`` can still override them."""
    hints = typing.get_type_hints(type(value))
    fields = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if v is None:
            (kind,) = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
            v = ml_collections.FieldReference(None, field_type=kind)
        fields[f.name] = v
    return ml_collections.ConfigDict(fields)


def defaults(model_name: str) -> ml_collections.ConfigDict:
    """Every key the trainer reads, at the typed dataclasses' defaults."""
    c = _section(TrainConfig(model_name=model_name))
    c.data = _section(input_pipeline.InputConfig())
    c.optim = _section(optim.OptimConfig())
    c.sharding = _section(sharding.ShardingConfig())
    return c


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` after passing every section through its typed boundary; raises
    ConfigError (one line) for an unknown key or invalid value. The trainer repeats this
    on the final config, so ``--config.x=...`` overrides are checked too."""
    try:
        TrainConfig.from_config(config)
        input_pipeline.InputConfig.from_config(config.data)
        optim.OptimConfig.from_config(config.optim, steps_per_epoch=1)
        sharding.ShardingConfig.from_config(config.get("sharding"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def apply_args(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict
               ) -> ml_collections.ConfigDict:
    """Applies the :data:`STANDARD_ARGS` given in ``a`` on top of the finished recipe, then
    :func:`check`\\ s the result:
      ``res=N``     input resolution (e.g. ``res=384`` to fine-tune);
      ``batch=N``   global batch size (the learning rate is *not* rescaled);
      ``epochs=X``  training epochs;  ``steps=N`` a fixed number of steps instead;
      ``bf16``      bfloat16 compute with float32 parameters.
    (``digits`` is applied by the file itself, see :func:`digits`.)
    """
    for key in ("res", "batch", "steps"):
        if a[key] is not None and a[key] < 1:
            raise ConfigError(f"Config argument {key!r} must be >= 1, got {a[key]}")
    if a.epochs is not None and a.epochs <= 0:
        raise ConfigError(f"Config argument 'epochs' must be > 0, got {a.epochs}")
    if a.res is not None:
        c.data.image_size = a.res
    if a.batch is not None:
        c.batch_size = a.batch
    if a.epochs is not None:
        c.num_epochs = a.epochs
    if a.steps is not None:
        c.num_train_steps = a.steps
    if a.bf16:
        c.compute_dtype = "bfloat16"
    return check(c)


def digits(c: ml_collections.ConfigDict, *, epochs: float) -> ml_collections.ConfigDict:
    """Replaces the data, schedule and logging sections by the quick start on the
    embedded scikit-learn digits (1,797 real 8x8 scans, 10 classes), keeping the model.

    Trains the full-size model on CPU in minutes: 32x32 input, no flips (digits are not
    mirror symmetric), a mild random-resized crop, no RandAugment/mixup, label smoothing
    0.1, batch 64, AdamW 1e-3 with 1 warmup epoch, cosine decay to 1e-5, weight decay
    0.05, clipping 1.0, no EMA, for ``epochs`` epochs (each file states how many its
    model needs). The file then sets its own quick-start model overrides.
    """
    c.data.update(
        name="digits", train_split="train", eval_split="test", num_classes=10,
        image_size=32, crop_pct=1.0, inception_crop=True, inception_min_area=0.6,
        flip=False, randaugment_layers=0, randaugment_magnitude=0, mixup_alpha=0.0,
        cutmix_alpha=0.0, label_smoothing=0.1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        shuffle_buffer=2_000, cache=True,
    )
    c.optim.update(
        name="adamw", learning_rate=1e-3, end_learning_rate=1e-5, schedule="cosine",
        warmup_epochs=1.0, weight_decay=0.05, grad_clip_norm=1.0, ema_decay=0.0,
    )
    c.update(batch_size=64, eval_batch_size=128, num_epochs=epochs, log_every_steps=20,
             eval_every_steps=100, checkpoint_every_steps=100, keep_checkpoints=2)
    return c


def load_family(config_file: str, name: str) -> types.ModuleType:
    """The family file ``configs/<name>.py`` next to ``config_file`` (an experiment file's
    ``__file__``), loaded by path: ``configs/`` is not a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"hybrid_attn_configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
