"""Preprocessing ops in TF: decode, Inception crop, eval resize/crop, labels, mixup/cutmix.

Per-example ops take uint8 [H, W, 3] images and an explicit stateless seed (a [2] int
tensor), so a pipeline is reproducible from its seed alone. Resizing is bicubic with
antialiasing (PIL's behaviour, as in the timm evaluation of these models).
"""

from __future__ import annotations

import math

import tensorflow as tf

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/... bytes -> uint8 [H, W, 3]."""
    return tf.io.decode_image(data, channels=3, expand_animations=False)


def resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    """Bicubic antialiased resize to ``size`` = (height, width); float32 in [0, 255]."""
    out = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=True)
    return tf.clip_by_value(out, 0.0, 255.0)


def _inception_window(shape: tf.Tensor, seed: tf.Tensor, min_area: float) -> tf.Tensor:
    """[y, x, h, w] of a random crop covering [min_area, 1] of the image with aspect in 3/4..4/3.

    Szegedy et al. 2015 ("Going deeper with convolutions", Sec. 6); falls back to the whole
    image when no valid window is found.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=(min_area, 1.0),
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def inception_crop(image: tf.Tensor, seed: tf.Tensor, min_area: float) -> tf.Tensor:
    """Random-resized-crop window of a decoded uint8 image (not yet resized)."""
    y, x, h, w = tf.unstack(_inception_window(tf.shape(image), seed, min_area))
    return image[y : y + h, x : x + w]


def decode_and_inception_crop(data: tf.Tensor, seed: tf.Tensor, min_area: float) -> tf.Tensor:
    """Inception crop of encoded bytes; JPEGs decode only the window (much faster on ImageNet)."""

    def jpeg() -> tf.Tensor:
        window = _inception_window(tf.image.extract_jpeg_shape(data), seed, min_area)
        return tf.image.decode_and_crop_jpeg(data, window, channels=3)

    return tf.cond(
        tf.io.is_jpeg(data), jpeg, lambda: inception_crop(decode_image(data), seed, min_area)
    )


def center_crop_resize(image: tf.Tensor, size: int, crop_pct: float) -> tf.Tensor:
    """Evaluation view: shorter side to ``floor(size / crop_pct)``, then a central size x size.

    ``crop_pct == 1`` is a plain resize to size x size. Returns float32 in [0, 255].
    """
    if crop_pct == 1.0:
        return resize(image, (size, size))
    scale_size = math.floor(size / crop_pct)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    new_h = tf.where(h == short, scale_size, scale_size * h // short)
    new_w = tf.where(w == short, scale_size, scale_size * w // short)
    out = resize(image, tf.stack([new_h, new_w]))
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    return out[top : top + size, left : left + size]


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Rounds a float [0, 255] image back to uint8 (for RandAugment, which works on bytes)."""
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def normalize(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
    """[0, 255] image -> float32 ``(image / 255 - mean) / std`` per channel."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def smooth_one_hot(label: tf.Tensor, num_classes: int, smoothing: float) -> tf.Tensor:
    """One-hot target with label smoothing (Szegedy et al. 2016, Sec. 7): sums to 1."""
    one_hot = tf.one_hot(label, num_classes, dtype=tf.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def _sample_beta(alpha: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One Beta(alpha, alpha) draw as G1 / (G1 + G2) of two Gamma(alpha) draws."""
    g = tf.random.stateless_gamma([2], seed, alpha=alpha)
    return g[0] / (g[0] + g[1])


def mix_batch(
    images: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with its reverse.

    Example i is paired with example B-1-i (timm's batch mode). With both alphas > 0 one of
    the two is picked per batch with probability 1/2. CutMix pastes a box of area about
    (1 - lam) and then sets lam to the box's exact area, so the label weights equal the
    pixel weights. Returns (images [B, H, W, C] float32, labels [B, K] float32).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0")
    choice_seed, lam_seed, y_seed, x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], choice_seed) < 0.5
    else:
        use_cutmix = tf.constant(cutmix_alpha > 0)
    alpha = tf.where(use_cutmix, float(cutmix_alpha), float(mixup_alpha))
    lam = _sample_beta(alpha, lam_seed)
    flipped = tf.reverse(images, axis=[0])
    height, width = images.shape[1], images.shape[2]

    def cutmix() -> tuple[tf.Tensor, tf.Tensor]:
        ratio = tf.sqrt(1.0 - lam)
        half_h = tf.cast(height * ratio, tf.int32) // 2
        half_w = tf.cast(width * ratio, tf.int32) // 2
        cy = tf.random.stateless_uniform([], y_seed, 0, height, dtype=tf.int32)
        cx = tf.random.stateless_uniform([], x_seed, 0, width, dtype=tf.int32)
        y0, y1 = tf.maximum(cy - half_h, 0), tf.minimum(cy + half_h, height)
        x0, x1 = tf.maximum(cx - half_w, 0), tf.minimum(cx + half_w, width)
        rows = tf.range(height)[:, None]
        cols = tf.range(width)[None, :]
        box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        box_area = tf.cast((y1 - y0) * (x1 - x0), tf.float32)
        mixed = tf.where(box[None, :, :, None], flipped, images)
        return mixed, 1.0 - box_area / float(height * width)

    def mixup() -> tuple[tf.Tensor, tf.Tensor]:
        return lam * images + (1.0 - lam) * flipped, lam

    mixed, lam = tf.cond(use_cutmix, cutmix, mixup)
    return mixed, lam * labels + (1.0 - lam) * tf.reverse(labels, axis=[0])
