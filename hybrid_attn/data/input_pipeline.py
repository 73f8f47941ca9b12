"""Host-side tf.data pipelines: an infinite augmented training stream and exact evaluation.

Training: one global stream of examples is defined by ``seed`` alone, and process ``p``
of ``P`` takes rows ``[p * B/P, (p + 1) * B/P)`` of each global batch of ``B``, so the
global batches are the same whatever the process count. Evaluation: each process reads
its own part of the split (``tfds.split_for_jax_process``). Batches are numpy arrays of
``global_batch_size // process_count`` examples; the trainer assembles them into global
arrays. All randomness is stateless and derived from ``seed`` and the example's position
in the stream, so a pipeline is reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hybrid_attn.data import digits, preprocess, randaugment

DIGITS = "digits"
_AUTOTUNE = tf.data.AUTOTUNE


class DatasetNotPreparedError(FileNotFoundError):
    """The requested TFDS dataset has not been downloaded and prepared in ``data_dir``."""


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Typed copy of ``config.data`` (its defaults are the config's: ``config_lib.defaults``).

    ``cache`` keeps the decoded training images in memory (for small datasets like digits).
    """

    name: str = "imagenet2012"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    num_classes: int = 1000
    image_size: int = 224
    crop_pct: float = 0.875
    inception_crop: bool = True
    inception_min_area: float = 0.08
    flip: bool = True
    randaugment_layers: int = 0
    randaugment_magnitude: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    shuffle_buffer: int = 10_000
    cache: bool = False
    prefetch: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        checks = {
            "num_classes >= 1": self.num_classes >= 1,
            "image_size >= 1": self.image_size >= 1,
            "0 < crop_pct <= 1": 0.0 < self.crop_pct <= 1.0,
            "0 < inception_min_area <= 1": 0.0 < self.inception_min_area <= 1.0,
            "randaugment_layers >= 0": self.randaugment_layers >= 0,
            "randaugment_magnitude >= 0": self.randaugment_magnitude >= 0,
            "mixup_alpha >= 0": self.mixup_alpha >= 0,
            "cutmix_alpha >= 0": self.cutmix_alpha >= 0,
            "0 <= label_smoothing < 1": 0.0 <= self.label_smoothing < 1.0,
            "mean has 3 values": len(self.mean) == 3,
            "std has 3 positive values": len(self.std) == 3 and min(self.std) > 0,
            "shuffle_buffer >= 1": self.shuffle_buffer >= 1,
            "prefetch >= 0": self.prefetch >= 0,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"Invalid data config: need {'; '.join(failed)} (got {self})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> InputConfig:
        """Builds from ``config.data`` (a ConfigDict or mapping); unknown keys raise ValueError."""
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown data config keys {unknown}; valid: {sorted(known)}")
        return cls(**values)


def _not_prepared_message(cfg: InputConfig, builder: tfds.core.DatasetBuilder) -> str:
    root = builder.data_dir_root
    lines = [f"Dataset {cfg.name!r} is not prepared under {root} (expected {builder.data_dir})."]
    if cfg.name.startswith("imagenet2012"):
        lines.append(
            "ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar (from https://image-net.org) in {root}/downloads/manual/, "
            f"then run `tfds build {cfg.name} --data_dir={root}`."
        )
    else:
        lines.append(f"Prepare it with `tfds build {cfg.name} --data_dir={root}`.")
    lines.append(
        "To try the code without any download, train on the embedded digits: "
        "--config=configs/coatnet0.py:digits"
    )
    return "\n".join(lines)


def get_builder(cfg: InputConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder for ``cfg.name``, prepared; never touches the network.

    ``digits`` is built locally on first use (about a second). Any other dataset must
    already be prepared in ``cfg.data_dir`` (default: the TFDS data dir), otherwise
    :class:`DatasetNotPreparedError` says how to prepare it.
    """
    if cfg.name == DIGITS:
        builder = digits.Digits(data_dir=cfg.data_dir)
        builder.download_and_prepare()
        return builder
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_not_prepared_message(cfg, builder))
    return builder


def num_examples(cfg: InputConfig, split: str) -> int:
    """Number of examples in ``split`` (TFDS split syntax, e.g. ``train[:10%]``)."""
    return get_builder(cfg).info.splits[split].num_examples


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"Global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def _read(
    builder: tfds.core.DatasetBuilder, split: Any, *, shuffle_seed: int | None
) -> tf.data.Dataset:
    """(encoded image bytes, int32 label) pairs; files shuffled iff ``shuffle_seed`` is set."""
    ds = builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(
            shuffle_seed=shuffle_seed, try_autocache=False, skip_prefetch=True
        ),
    )
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))


def _train_example(
    cfg: InputConfig,
    key: tf.Tensor,
    decoded: bool,
    index: tf.Tensor,
    image: tf.Tensor,
    label: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Inception crop (or resize), flip, RandAugment, normalise; smoothed one-hot label."""
    seed = tf.random.experimental.stateless_fold_in(key, index)
    crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if cfg.inception_crop and decoded:
        image = preprocess.inception_crop(image, crop_seed, cfg.inception_min_area)
    elif cfg.inception_crop:
        image = preprocess.decode_and_inception_crop(image, crop_seed, cfg.inception_min_area)
    elif not decoded:
        image = preprocess.decode_image(image)
    image = preprocess.resize(image, (cfg.image_size, cfg.image_size))
    if cfg.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if cfg.randaugment_layers:
        image = randaugment.randaugment(
            preprocess.to_uint8(image), cfg.randaugment_layers, cfg.randaugment_magnitude, ra_seed
        )
    image = preprocess.normalize(image, cfg.mean, cfg.std)
    return image, preprocess.smooth_one_hot(label, cfg.num_classes, cfg.label_smoothing)


def train_dataset(
    cfg: InputConfig,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """This process's part of the infinite training stream as a tf.data.Dataset (see
    train_iterator).

    The global stream is a sequence of epochs, epoch ``e`` being the split in file order
    shuffled with a buffer seeded by ``(seed, e)``; example ``n`` of the stream is
    augmented with randomness keyed by ``n``, and this process keeps the examples at its
    rows of each global batch (it reads every record but decodes only its own). So the
    batches from ``start_step`` on are exactly those an uninterrupted run sees, with any
    process count, and resuming costs reading (not decoding) at most one epoch of records.
    Mixup/CutMix pair examples within the local batch, so only they depend on the count.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    builder = get_builder(cfg)
    per_epoch = builder.info.splits[cfg.train_split].num_examples
    key = tf.constant([seed, 0], tf.int64)
    example_key = tf.random.experimental.stateless_fold_in(key, 0)
    batch_key = tf.random.experimental.stateless_fold_in(key, 1)

    epoch_ds = _read(builder, cfg.train_split, shuffle_seed=None)
    if cfg.cache:
        epoch_ds = epoch_ds.map(
            lambda im, lb: (preprocess.decode_image(im), lb), _AUTOTUNE
        ).cache()

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        shuffled = epoch_ds.shuffle(cfg.shuffle_buffer, seed=seed * 1_000_003 + e)
        return shuffled.enumerate(start=e * per_epoch)

    first_example = start_step * global_batch_size
    ds = tf.data.Dataset.range(first_example // per_epoch, 2**62).flat_map(epoch)
    ds = ds.skip(first_example % per_epoch)
    if count > 1:
        ds = ds.filter(lambda i, ex: (i % global_batch_size) // local_batch == index)
    example_fn = functools.partial(_train_example, cfg, example_key, cfg.cache)
    ds = ds.map(lambda i, ex: example_fn(i, *ex), num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        mix = functools.partial(
            preprocess.mix_batch, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha
        )
        ds = ds.enumerate(start=start_step).map(
            lambda i, b: mix(*b, tf.random.experimental.stateless_fold_in(batch_key, i)),
            num_parallel_calls=_AUTOTUNE,
        )
    ds = ds.map(lambda image, label: {"image": image, "label": label})
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(cfg.prefetch)


def train_iterator(
    cfg: InputConfig,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite shuffled, augmented training batches for this process.

    Yields ``image`` float32 [local_batch, S, S, 3] normalised with ``cfg.mean``/``cfg.std``
    and ``label`` float32 [local_batch, num_classes] (smoothed one-hot, mixed by
    mixup/cutmix), local_batch = global_batch_size // process_count. The same seed and
    process give the same batches; ``start_step`` starts at that batch of the same stream
    (for resuming). ``process_index``/``process_count`` default to JAX's.
    """
    ds = train_dataset(
        cfg,
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(tfds.as_numpy(ds))


def _eval_example(cfg: InputConfig, image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
    image = preprocess.center_crop_resize(
        preprocess.decode_image(image), cfg.image_size, cfg.crop_pct
    )
    image = tf.ensure_shape(image, (cfg.image_size, cfg.image_size, 3))
    return {
        "image": preprocess.normalize(image, cfg.mean, cfg.std),
        "label": label,
        "mask": tf.constant(True),
    }


def eval_iterator(
    cfg: InputConfig,
    split: str,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One fresh, ordered pass over ``split``: every example exactly once across processes.

    Yields ``image`` float32 [local_batch, S, S, 3] (shorter side resized to
    S / crop_pct, centre crop S), ``label`` int32 [local_batch] and ``mask`` bool
    [local_batch]. Batches are padded to full size with mask=False, and every process
    yields the same number of batches (trailing ones fully masked), so multi-host
    collectives stay in lockstep.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    builder = get_builder(cfg)
    parts = [
        tfds.split_for_jax_process(split, process_index=p, process_count=count)
        for p in range(count)
    ]
    largest = max(builder.info.splits[part].num_examples for part in parts)
    num_batches = math.ceil(largest / local_batch)

    ds = _read(builder, parts[index], shuffle_seed=None)
    ds = ds.map(functools.partial(_eval_example, cfg), num_parallel_calls=_AUTOTUNE)
    padding = {
        "image": tf.zeros((cfg.image_size, cfg.image_size, 3), tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.batch(local_batch).take(num_batches).prefetch(cfg.prefetch)
    return iter(tfds.as_numpy(ds))
