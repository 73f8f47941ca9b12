"""Building blocks for the experiment configs under ``configs/``.

Every config file is ``get_config(arg)`` returning an ``ml_collections.ConfigDict``. The
short argument string after the ``:`` in ``--config=configs/x.py:ARG`` is parsed by
:func:`parse_arg` into typed values (``digits``, ``res=384``, ...). The shared recipes
below fill the data and optimiser sections so each config only states what its paper says.

The trainer converts the ConfigDict into typed values at its boundary; modules never see
a ConfigDict.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses ``"digits,res=384"`` into a ConfigDict typed by the defaults in ``spec``.

    A bare key sets a boolean to True. Unknown keys and values of the wrong type raise
    ValueError naming the valid keys, so a typo never silently runs the wrong experiment.
    """
    out = ml_collections.ConfigDict(dict(spec))
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, sep, value = token.partition("=")
        if key not in spec:
            raise ValueError(
                f"Unknown config argument {key!r} in {arg!r}; valid: {', '.join(sorted(spec))}"
            )
        default = spec[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"Config argument {key!r} needs a value, e.g. {key}={default}")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Config argument {key!r} expects true/false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError as e:
                raise ValueError(
                    f"Config argument {key!r} expects {type(default).__name__}, got {value!r}"
                ) from e
    return out


def base_config(model_name: str) -> ml_collections.ConfigDict:
    """Every key the trainer reads, with neutral defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_name = model_name
    # Overrides passed to ``hybrid_attn.models.get_model`` (drop_path_rate, flags...).
    c.model = ml_collections.ConfigDict()
    c.compute_dtype = "float32"  # "bfloat16" for mixed precision; parameters stay float32.

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_classes = 1000
    c.data.image_size = 224
    c.data.crop_pct = 0.875  # eval: resize to image_size / crop_pct, then center crop.
    c.data.inception_crop = True
    c.data.inception_min_area = 0.08
    c.data.flip = True
    c.data.randaugment_layers = 0  # 0 disables RandAugment.
    c.data.randaugment_magnitude = 0
    c.data.mixup_alpha = 0.0  # 0 disables.
    c.data.cutmix_alpha = 0.0  # 0 disables; with both > 0 one is picked per batch.
    c.data.label_smoothing = 0.0
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.shuffle_buffer = 10_000
    c.data.cache = False
    c.data.prefetch = 2

    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.num_epochs = 300.0
    c.num_train_steps = -1  # > 0 overrides num_epochs.

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | sgd
    c.optim.learning_rate = 1e-3  # peak, for the global batch_size above
    c.optim.end_learning_rate = 1e-5
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.warmup_steps = 10_000
    c.optim.warmup_epochs = -1.0  # > 0 overrides warmup_steps
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.grad_clip_norm = 1.0  # <= 0 disables.
    c.optim.ema_decay = 0.0  # > 0 keeps an EMA of the parameters, used for evaluation.

    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.init_checkpoint = ""  # used only when the workdir holds no checkpoint.
    c.profile = False  # True: a clu Profile trace of 5 steps into the workdir (process 0).
    return c


def imagenet(
    c: ml_collections.ConfigDict,
    *,
    res: int = 224,
    randaugment: tuple[int, int] = (2, 15),
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.1,
) -> ml_collections.ConfigDict:
    """ImageNet-1k (tfds ``imagenet2012``) with the papers' Inception-crop recipe."""
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_classes = 1000
    c.data.image_size = res
    c.data.inception_crop = True
    c.data.flip = True
    c.data.randaugment_layers, c.data.randaugment_magnitude = randaugment
    c.data.mixup_alpha = mixup_alpha
    c.data.cutmix_alpha = cutmix_alpha
    c.data.label_smoothing = label_smoothing
    return c


def digits(c: ml_collections.ConfigDict, *, res: int = 32) -> ml_collections.ConfigDict:
    """The embedded scikit-learn digits (1,797 real 8x8 scans, 10 classes) as a quick start.

    Trains the full-size model on CPU in minutes: no flips (digits are not mirror
    symmetric), a mild random-resized crop, no RandAugment/mixup, short schedule.
    """
    c.data.name = "digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.num_classes = 10
    c.data.image_size = res
    c.data.crop_pct = 1.0
    c.data.inception_crop = True
    c.data.inception_min_area = 0.6
    c.data.flip = False
    c.data.randaugment_layers = c.data.randaugment_magnitude = 0
    c.data.mixup_alpha = c.data.cutmix_alpha = 0.0
    c.data.label_smoothing = 0.1
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.shuffle_buffer = 2_000
    c.data.cache = True
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 8.0
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    c.optim.end_learning_rate = 1e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1.0
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 1.0
    c.optim.ema_decay = 0.0
    c.log_every_steps = 20
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    return c


# ImageNet recipes shared by several experiment files; each file's docstring cites its
# source. ``build(recipe=...)`` starts from one and the file's own arguments override it.
RESNET_90_EPOCHS = {
    # The ResNet-50 baseline recipe the BoTNet and SASA papers compare against.
    "num_epochs": 90.0,
    "optim": {"name": "sgd", "learning_rate": 1.6, "end_learning_rate": 0.0,
              "warmup_epochs": 5.0, "weight_decay": 1e-4, "momentum": 0.9,
              "nesterov": True, "grad_clip_norm": 0.0},
    "data": {"randaugment_layers": 0, "randaugment_magnitude": 0, "mixup_alpha": 0.0,
             "label_smoothing": 0.1},
}
BOTNET_S1_350_EPOCHS = {
    # BoTNet-S1 (ResNet-RS-style): longer schedule, lower weight decay, RandAugment, EMA.
    "num_epochs": 350.0,
    "optim": {**RESNET_90_EPOCHS["optim"], "weight_decay": 4e-5, "ema_decay": 0.9999},
    "data": {"randaugment_layers": 2, "mixup_alpha": 0.0, "label_smoothing": 0.1},
}
TWINS_300_EPOCHS = {
    # Twins / DeiT-style: AdamW 5e-4 x batch/512, 5 warmup epochs, clip 5, RA(2, 9),
    # mixup 0.8 / cutmix 1.0.
    "batch_size": 1024,
    "optim": {"learning_rate": 5e-4 * 1024 / 512, "end_learning_rate": 1e-5,
              "warmup_epochs": 5.0, "weight_decay": 0.05, "grad_clip_norm": 5.0},
    "data": {"randaugment_layers": 2, "randaugment_magnitude": 9, "mixup_alpha": 0.8,
             "cutmix_alpha": 1.0, "label_smoothing": 0.1},
}


def build(
    arg: str | None,
    *,
    model_name: str,
    recipe: dict | None = None,
    res: int | None = None,
    batch_size: int | None = None,
    num_epochs: float | None = None,
    model: dict | None = None,
    optim: dict | None = None,
    data: dict | None = None,
    digits_model: dict | None = None,
    digits_res: int = 32,
    digits_epochs: float | None = None,
) -> ml_collections.ConfigDict:
    """The standard experiment config: the paper's ImageNet recipe, or the digits quick start.

    ``arg`` (the text after ``:`` in ``--config=FILE:ARG``) accepts:
      ``digits``          the embedded digits quick start instead of ImageNet;
      ``res=N``           input resolution (e.g. ``res=384`` to fine-tune);
      ``batch=N``         global batch size (learning rate is *not* rescaled);
      ``epochs=X``        training epochs;  ``steps=N`` a fixed number of steps instead;
      ``bf16``            bfloat16 compute with float32 parameters.
    The ImageNet recipe is ``base_config``'s (CoAtNet's) unless ``recipe`` names one of
    the shared recipes above; ``res``/``batch_size``/``num_epochs`` and the
    ``model``/``optim``/``data`` sections override it. ``digits_model`` overrides ``model``
    for the quick start (e.g. a lower drop-path rate) and ``digits_epochs`` its length
    (models that learn more slowly from 1,437 images need more than the default 8).
    """
    recipe = recipe or {}

    def pick(value, key, default):
        return value if value is not None else recipe.get(key, default)

    a = parse_arg(arg, digits=False, res=0, batch=0, epochs=0.0, steps=0, bf16=False)
    c = base_config(model_name)
    c.model.update({**recipe.get("model", {}), **(model or {})})
    if a.digits:
        digits(c, res=a.res or digits_res)
        c.model.update(digits_model or {})
        c.num_epochs = digits_epochs or c.num_epochs
    else:
        imagenet(c, res=a.res or pick(res, "res", 224))
        c.batch_size = pick(batch_size, "batch_size", c.batch_size)
        c.num_epochs = pick(num_epochs, "num_epochs", c.num_epochs)
        c.optim.update({**recipe.get("optim", {}), **(optim or {})})
        c.data.update({**recipe.get("data", {}), **(data or {})})
    if a.batch:
        c.batch_size = a.batch
    if a.epochs:
        c.num_epochs = a.epochs
    if a.steps:
        c.num_train_steps = a.steps
    if a.bf16:
        c.compute_dtype = "bfloat16"
    return c
