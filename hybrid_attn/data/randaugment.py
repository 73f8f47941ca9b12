"""RandAugment (Cubuk et al. 2020) in TF ops on uint8 [H, W, 3] images.

The op set and the magnitude -> argument mapping are those of the reference TPU
implementation that CoAtNet and BoTNet trained with (tensorflow/tpu ``autoaugment.py``,
also big_vision's): 16 ops, magnitudes on a 0..10 scale (larger values extrapolate, e.g.
RandAugment(2, 15)), geometric ops fill with grey 128. Two deliberate differences:
translations and cutout are a fraction of the image size (the reference's pixel constants
divided by 224, so ImageNet at 224 is unchanged and small images are not wiped out), and
Contrast blends towards the true mean grey level (PIL's definition; the reference code
used the pixel count / 256). Pixel ops follow PIL's ``ImageOps``/``ImageEnhance``.
Randomness is stateless: every call takes a [2] int seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import tensorflow as tf

from hybrid_attn.data.preprocess import to_uint8

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
MAX_LEVEL = 10.0
FILL = 128
_MAX_ROTATE_DEGREES = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 100.0 / 224.0  # reference: 100 pixels at 224
_MAX_CUTOUT = 40.0 / 224.0  # reference: half-size 40 pixels at 224
_MAX_POSTERIZE_BITS = 4
_MAX_SOLARIZE_ADD = 110


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """``degenerate + factor * (image - degenerate)``, clipped: PIL ImageEnhance semantics.

    factor 0 gives the degenerate image, 1 the original, > 1 extrapolates.
    """
    d = tf.cast(degenerate, tf.float32)
    return to_uint8(d + factor * (tf.cast(image, tf.float32) - d))


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel linearly so its min maps to 0 and its max to 255."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return to_uint8((x - offset) * scale)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation, PIL's ``ImageOps.equalize`` algorithm."""
    values = tf.cast(image, tf.int32)
    flat = tf.reshape(values + tf.range(3) * 256, [-1])
    histo = tf.reshape(tf.math.bincount(flat, minlength=768, maxlength=768), [3, 256])
    top_count = tf.gather(histo, tf.reduce_max(values, axis=[0, 1]), batch_dims=1)
    step = (tf.reduce_sum(histo, axis=1) - top_count)[:, None] // 256
    lut = (step // 2 + tf.cumsum(histo, axis=1, exclusive=True)) // tf.maximum(step, 1)
    lut = tf.where(step > 0, tf.minimum(lut, 255), tf.range(256)[None])
    out = tf.gather(lut, tf.transpose(values, [2, 0, 1]), batch_dims=1)
    return tf.cast(tf.transpose(out, [1, 2, 0]), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
    """255 - image."""
    return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
    """Keeps the ``bits`` most significant bits of every value (0 bits: black)."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return tf.bitwise.bitwise_and(image, tf.constant(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: int | tf.Tensor) -> tf.Tensor:
    """Inverts every value >= threshold."""
    return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
    """Adds ``addition`` (clipped to 255) to every value below ``threshold``."""
    values = tf.cast(image, tf.int32)
    added = tf.cast(tf.clip_by_value(values + addition, 0, 255), tf.uint8)
    return tf.where(values < threshold, added, image)


def _grey(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma as float32 [H, W, 1] (PIL's ``convert("L")``)."""
    weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
    return tf.reduce_sum(tf.cast(image, tf.float32) * weights, axis=-1, keepdims=True)


def color(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """Saturation: blends with the grey version of the image."""
    grey = tf.round(_grey(image))
    return blend(tf.broadcast_to(grey, tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """Blends with a flat image at the mean grey level."""
    mean = tf.round(tf.reduce_mean(_grey(image)))
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """Blends with black."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """Blends with PIL's SMOOTH-filtered image (3x3 kernel, centre 5, others 1, / 13).

    The one-pixel border keeps its original values, as in PIL.
    """
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x[0])
    return blend(to_uint8(degenerate), image, factor)


def _transform(image: tf.Tensor, matrix: list, fill: int) -> tf.Tensor:
    """Projective warp: output pixel (x, y) reads input ((a0 x + a1 y + a2), (b0 x + b1 y + b2)).

    ``matrix`` is [a0, a1, a2, b0, b1, b2, c0, c1] (tf.raw_ops.ImageProjectiveTransformV3),
    nearest-neighbour sampling, pixels from outside the image are ``fill``.
    """
    transform = tf.cast(tf.stack(matrix), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=float(fill),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def rotate(image: tf.Tensor, degrees: float | tf.Tensor, fill: int = FILL) -> tf.Tensor:
    """Rotates counter-clockwise about the image centre (as PIL's ``Image.rotate``)."""
    shape = tf.cast(tf.shape(image), tf.float32)
    h, w = shape[0] - 1.0, shape[1] - 1.0
    rad = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(rad), tf.sin(rad)
    x_offset = (w - (cos * w - sin * h)) / 2.0
    y_offset = (h - (sin * w + cos * h)) / 2.0
    return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0], fill)


def shear_x(image: tf.Tensor, level: float | tf.Tensor, fill: int = FILL) -> tf.Tensor:
    """Output (x, y) reads input (x + level * y, y)."""
    return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], fill)


def shear_y(image: tf.Tensor, level: float | tf.Tensor, fill: int = FILL) -> tf.Tensor:
    """Output (x, y) reads input (x, y + level * x)."""
    return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0], fill)


def translate_x(image: tf.Tensor, pixels: float | tf.Tensor, fill: int = FILL) -> tf.Tensor:
    """Moves the content ``pixels`` to the right (left if negative)."""
    return _transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0], fill)


def translate_y(image: tf.Tensor, pixels: float | tf.Tensor, fill: int = FILL) -> tf.Tensor:
    """Moves the content ``pixels`` down (up if negative)."""
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0], fill)


def cutout(
    image: tf.Tensor, half_size: int | tf.Tensor, seed: tf.Tensor, fill: int = FILL
) -> tf.Tensor:
    """Fills a square of side 2 * half_size (clipped at the border) at a random centre."""
    shape = tf.shape(image)
    y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    cy = tf.random.stateless_uniform([], y_seed, 0, shape[0], dtype=tf.int32)
    cx = tf.random.stateless_uniform([], x_seed, 0, shape[1], dtype=tf.int32)
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]
    box = (rows >= cy - half_size) & (rows < cy + half_size)
    box &= (cols >= cx - half_size) & (cols < cx + half_size)
    return tf.where(box, tf.constant(fill, image.dtype), image)


def apply_op(name: str, image: tf.Tensor, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
    """Applies RandAugment op ``name`` at ``magnitude`` (0..10 scale, the reference mapping).

    Geometric ops flip the sign of their argument with probability 1/2 (drawn from ``seed``).
    """
    frac = magnitude / MAX_LEVEL
    sign_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    shape = tf.cast(tf.shape(image), tf.float32)
    enhance = frac * 1.8 + 0.1
    ops: dict[str, Callable[[], tf.Tensor]] = {
        "AutoContrast": lambda: auto_contrast(image),
        "Equalize": lambda: equalize(image),
        "Invert": lambda: invert(image),
        "Rotate": lambda: rotate(image, sign * frac * _MAX_ROTATE_DEGREES),
        "Posterize": lambda: posterize(image, min(int(frac * _MAX_POSTERIZE_BITS), 8)),
        "Solarize": lambda: solarize(image, int(frac * 256)),
        "Color": lambda: color(image, enhance),
        "Contrast": lambda: contrast(image, enhance),
        "Brightness": lambda: brightness(image, enhance),
        "Sharpness": lambda: sharpness(image, enhance),
        "ShearX": lambda: shear_x(image, sign * frac * _MAX_SHEAR),
        "ShearY": lambda: shear_y(image, sign * frac * _MAX_SHEAR),
        "TranslateX": lambda: translate_x(image, sign * frac * _MAX_TRANSLATE * shape[1]),
        "TranslateY": lambda: translate_y(image, sign * frac * _MAX_TRANSLATE * shape[0]),
        "Cutout": lambda: cutout(
            image,
            tf.cast(frac * _MAX_CUTOUT * tf.minimum(shape[0], shape[1]), tf.int32),
            op_seed,
        ),
        "SolarizeAdd": lambda: solarize_add(image, int(frac * _MAX_SOLARIZE_ADD)),
    }
    if name not in ops:
        raise ValueError(f"Unknown RandAugment op {name!r}; valid: {', '.join(OPS)}")
    return ops[name]()


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
    """Applies ``num_layers`` ops drawn uniformly from :data:`OPS`, each at ``magnitude``.

    RandAugment(N, M) of Cubuk et al. 2020 (Sec. 3): no per-op probabilities, one shared
    magnitude. uint8 [H, W, 3] in, same shape and dtype out.
    """
    layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)

    def layer(i: tf.Tensor, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        choice_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seeds[i]))
        index = tf.random.stateless_uniform([], choice_seed, 0, len(OPS), dtype=tf.int32)
        branches = [functools.partial(apply_op, name, image, magnitude, op_seed) for name in OPS]
        return i + 1, tf.ensure_shape(tf.switch_case(index, branches), image.shape)

    # A loop rather than unrolled layers: the 16 ops are traced once, whatever num_layers.
    return tf.while_loop(lambda i, _: i < num_layers, layer, (0, image))[1]
