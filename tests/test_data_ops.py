"""Preprocessing and RandAugment ops against brute-force references on tiny synthetic images."""

import numpy as np
import pytest
import tensorflow as tf

from hybrid_attn.data import preprocess
from hybrid_attn.data import randaugment as ra

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
SQUARE = RNG.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)


def seed(i: int) -> tf.Tensor:
    return tf.constant([i, 0], tf.int64)


def test_pixel_ops_exact():
    np.testing.assert_array_equal(ra.invert(IMAGE), 255 - IMAGE)
    np.testing.assert_array_equal(
        ra.solarize(IMAGE, 128), np.where(IMAGE < 128, IMAGE, 255 - IMAGE)
    )
    np.testing.assert_array_equal(ra.solarize(IMAGE, 256), IMAGE)
    added = np.where(IMAGE < 128, np.minimum(IMAGE.astype(int) + 100, 255), IMAGE)
    np.testing.assert_array_equal(ra.solarize_add(IMAGE, 100), added)
    np.testing.assert_array_equal(ra.posterize(IMAGE, 2), IMAGE // 64 * 64)
    np.testing.assert_array_equal(ra.posterize(IMAGE, 8), IMAGE)
    np.testing.assert_array_equal(ra.posterize(IMAGE, 0), np.zeros_like(IMAGE))
    np.testing.assert_array_equal(ra.brightness(IMAGE, 0.5), np.round(IMAGE / 2.0))
    np.testing.assert_array_equal(ra.brightness(IMAGE, 0.0), np.zeros_like(IMAGE))


def test_enhance_ops():
    grey = np.repeat(IMAGE[..., :1], 3, axis=-1)
    np.testing.assert_allclose(ra.color(grey, 0.0), grey, atol=1)  # grey has no colour to remove
    np.testing.assert_array_equal(ra.color(IMAGE, 1.0), IMAGE)
    luma = IMAGE.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    flat = ra.contrast(IMAGE, 0.0).numpy()
    np.testing.assert_array_equal(flat, np.full_like(IMAGE, round(luma.mean())))
    np.testing.assert_array_equal(ra.contrast(IMAGE, 1.0), IMAGE)
    # Sharpness with factor 0 is PIL's SMOOTH filter inside, the original on the border.
    smooth = IMAGE.astype(np.float64).copy()
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    for y in range(1, IMAGE.shape[0] - 1):
        for x in range(1, IMAGE.shape[1] - 1):
            for c in range(3):
                smooth[y, x, c] = np.sum(IMAGE[y - 1 : y + 2, x - 1 : x + 2, c] * kernel)
    np.testing.assert_allclose(ra.sharpness(IMAGE, 0.0), np.round(smooth), atol=1)
    np.testing.assert_array_equal(ra.sharpness(IMAGE, 1.0), IMAGE)


def test_auto_contrast_stretches_each_channel():
    image = np.stack([np.arange(50, 92).reshape(6, 7)] * 3, axis=-1).astype(np.uint8)
    image[..., 2] = 7  # a flat channel is left alone
    out = ra.auto_contrast(image).numpy()
    expected = np.round((image[..., 0].astype(np.float64) - 50) * 255.0 / 41.0)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    np.testing.assert_array_equal(out[..., 2], 7)


def test_equalize_matches_pil_algorithm():
    image = RNG.integers(40, 120, size=(24, 30, 3), dtype=np.uint8)
    expected = np.empty_like(image)
    for c in range(3):  # PIL.ImageOps.equalize, written out.
        histo = np.bincount(image[..., c].ravel(), minlength=256)
        used = histo[histo > 0]
        step = (used.sum() - used[-1]) // 256
        lut = list(range(256))
        if step:
            n = step // 2
            for i in range(256):
                lut[i] = min(n // step, 255)
                n += histo[i]
        expected[..., c] = np.array(lut)[image[..., c]]
    np.testing.assert_array_equal(ra.equalize(image), expected)
    assert expected.max() > 120  # the test image really gets stretched


def test_geometric_ops_exact():
    tx = ra.translate_x(IMAGE, 2.0).numpy()
    np.testing.assert_array_equal(tx[:, 2:], IMAGE[:, :-2])
    assert np.all(tx[:, :2] == ra.FILL)
    ty = ra.translate_y(IMAGE, -1.0).numpy()
    np.testing.assert_array_equal(ty[:-1], IMAGE[1:])
    assert np.all(ty[-1] == ra.FILL)
    np.testing.assert_array_equal(ra.rotate(SQUARE, 90.0), np.rot90(SQUARE))
    np.testing.assert_array_equal(ra.rotate(SQUARE, 0.0), SQUARE)
    sheared = ra.shear_x(IMAGE, 1.0).numpy()
    for y in range(IMAGE.shape[0]):
        for x in range(IMAGE.shape[1]):
            want = IMAGE[y, x + y] if x + y < IMAGE.shape[1] else [ra.FILL] * 3
            np.testing.assert_array_equal(sheared[y, x], want)
    sheared = ra.shear_y(IMAGE, 1.0).numpy()
    np.testing.assert_array_equal(sheared[:, 0], IMAGE[:, 0])
    np.testing.assert_array_equal(sheared[0, 1], IMAGE[1, 1])


def test_cutout_fills_one_clipped_square():
    image = np.zeros((12, 12, 3), np.uint8)
    for i in range(5):
        out = ra.cutout(image, 3, seed(i)).numpy()
        rows, cols = np.nonzero(out[..., 0])
        assert np.all(out[rows, cols] == ra.FILL)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == h * w and 3 <= h <= 6 and 3 <= w <= 6


def test_apply_op_magnitude_mapping():
    np.testing.assert_array_equal(
        ra.apply_op("Posterize", IMAGE, 5, seed(0)), ra.posterize(IMAGE, 2)
    )
    np.testing.assert_array_equal(
        ra.apply_op("Solarize", IMAGE, 5, seed(0)), ra.solarize(IMAGE, 128)
    )
    np.testing.assert_array_equal(ra.apply_op("Brightness", IMAGE, 5, seed(0)), IMAGE)
    signs = set()
    for i in range(6):
        out = ra.apply_op("Rotate", SQUARE, 10, seed(i)).numpy()
        hits = [s for s in (-1, 1) if np.array_equal(out, ra.rotate(SQUARE, 30.0 * s))]
        assert hits, "Rotate at magnitude 10 must rotate by +-30 degrees"
        signs.update(hits)
        shift = 100 / 224 * IMAGE.shape[1]
        out = ra.apply_op("TranslateX", IMAGE, 10, seed(i)).numpy()
        assert any(np.array_equal(out, ra.translate_x(IMAGE, s * shift)) for s in (-1, 1))
    assert signs == {-1, 1}
    with pytest.raises(ValueError, match="Unknown RandAugment op"):
        ra.apply_op("Flip", IMAGE, 5, seed(0))


def test_every_op_and_randaugment_keep_shape_and_dtype():
    image = RNG.integers(0, 256, size=(16, 12, 3), dtype=np.uint8)
    for name in ra.OPS:
        out = ra.apply_op(name, image, 15, seed(1))
        assert out.shape == image.shape and out.dtype == tf.uint8, name
    outs = [ra.randaugment(tf.constant(image), 2, 15, seed(i)).numpy() for i in range(4)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)
    np.testing.assert_array_equal(ra.randaugment(tf.constant(image), 2, 15, seed(0)), outs[0])


def test_center_crop_resize_geometry():
    # A horizontal ramp: value = 4 * x. Bicubic resizing keeps a ramp a ramp away from edges.
    ramp = np.broadcast_to((4 * np.arange(60))[None, :, None], (40, 60, 3)).astype(np.uint8)
    out = preprocess.center_crop_resize(tf.constant(ramp), 16, 0.5).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    # Shorter side 40 -> 32, so 60 -> 48; the crop keeps resized columns 16..31.
    source_x = (np.arange(16, 32) + 0.5) * (60 / 48) - 0.5
    np.testing.assert_allclose(out[8, :, 0], 4 * source_x, atol=0.6)
    plain = preprocess.center_crop_resize(tf.constant(ramp), 16, 1.0).numpy()
    assert plain.shape == (16, 16, 3)
    np.testing.assert_allclose(
        plain[8, 4:12, 0], 4 * ((np.arange(4, 12) + 0.5) * 60 / 16 - 0.5), atol=3
    )


def test_inception_crop_window_and_jpeg_path():
    image = RNG.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image, quality=100, chroma_downsampling=False)
    decoded = tf.io.decode_jpeg(jpeg)
    for i in range(6):
        crop = preprocess.inception_crop(decoded, seed(i), 0.3).numpy()
        h, w, _ = crop.shape
        assert 0.3 - 0.05 <= h * w / (40 * 50) <= 1.0
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
        np.testing.assert_array_equal(
            preprocess.decode_and_inception_crop(jpeg, seed(i), 0.3), crop
        )
        png = tf.io.encode_png(image)
        np.testing.assert_array_equal(
            preprocess.decode_and_inception_crop(png, seed(i), 0.3),
            preprocess.inception_crop(tf.constant(image), seed(i), 0.3),
        )


def test_labels_and_normalisation():
    labels = preprocess.smooth_one_hot(tf.constant([2, 0]), 4, 0.1).numpy()
    np.testing.assert_allclose(labels, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    out = preprocess.normalize(
        tf.constant([[[0.0, 127.5, 255.0]]]), (0.5, 0.5, 0.5), (0.5, 0.25, 1.0)
    )
    np.testing.assert_allclose(out, [[[-1.0, 0.0, 0.5]]])


def _mixed(mixup: float, cutmix: float, s: int):
    batch = 6
    values = 10.0 * (np.arange(batch) + 1)
    images = np.broadcast_to(values[:, None, None, None], (batch, 8, 8, 3)).astype(np.float32)
    labels = preprocess.smooth_one_hot(tf.range(batch), batch, 0.1)
    out_images, out_labels = preprocess.mix_batch(
        tf.constant(images), labels, seed(s), mixup_alpha=mixup, cutmix_alpha=cutmix
    )
    return values, out_images.numpy(), out_labels.numpy()


def _label_weight(labels: np.ndarray, i: int, batch: int) -> float:
    """Weight of example i's own class, undoing the 0.1 smoothing."""
    return (labels[i, i] - 0.1 / batch) / 0.9


def test_mixup_label_weight_matches_pixel_weight():
    values, images, labels = _mixed(0.8, 0.0, 3)
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
    for i in range(6):
        a, b = values[i], values[5 - i]
        assert np.ptp(images[i]) < 1e-4  # a uniform blend
        pixel_lam = (images[i, 0, 0, 0] - b) / (a - b)
        np.testing.assert_allclose(_label_weight(labels, i, 6), pixel_lam, atol=1e-5)
    assert 0.0 < pixel_lam < 1.0


def test_cutmix_label_weight_is_pasted_area():
    for s in range(3):
        values, images, labels = _mixed(0.0, 1.0, s)
        np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
        boxes = set()
        for i in range(6):
            own = images[i, ..., 0] == values[i]
            pasted = images[i, ..., 0] == values[5 - i]
            assert np.all(own | pasted)
            np.testing.assert_allclose(_label_weight(labels, i, 6), own.mean(), atol=1e-6)
            rows, cols = np.nonzero(pasted)
            if len(rows):  # the pasted region is one rectangle, the same for the whole batch
                assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
            boxes.add(pasted.tobytes())
        assert len(boxes) == 1


def test_mix_batch_picks_one_per_batch_when_both_enabled():
    kinds = set()
    for s in range(10):
        values, images, labels = _mixed(0.8, 1.0, s)
        uniform = np.ptp(images[0]) < 1e-4
        kinds.add("mixup" if uniform else "cutmix")
        if not uniform:
            assert set(np.unique(images[0])) <= {values[0], values[5]}
    assert kinds == {"mixup", "cutmix"}
    with pytest.raises(ValueError):
        preprocess.mix_batch(
            tf.zeros([2, 4, 4, 3]), tf.zeros([2, 3]), seed(0), mixup_alpha=0, cutmix_alpha=0
        )
