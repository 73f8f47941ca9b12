"""The embedded digits dataset and the train/eval pipelines on it (hermetic: tmp data_dir)."""

import collections
import dataclasses

import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds
from conftest import load_config

from hybrid_attn import data
from hybrid_attn.data import digits

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> data.InputConfig:
    config = load_config("coatnet0", "digits").data
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    return dataclasses.replace(data.InputConfig.from_config(config), shuffle_buffer=128)


def read_split(cfg: data.InputConfig, split: str) -> dict[str, np.ndarray]:
    ds = data.get_builder(cfg).as_dataset(split=split, batch_size=-1)
    return tfds.as_numpy(ds)


def bilinear_upsample(image: np.ndarray, size: int) -> np.ndarray:
    """Brute-force bilinear resize with half-pixel centres and edge clamping."""
    n = image.shape[0]
    out = np.empty((size, size))
    for y in range(size):
        for x in range(size):
            sy = min(max((y + 0.5) * n / size - 0.5, 0.0), n - 1.0)
            sx = min(max((x + 0.5) * n / size - 0.5, 0.0), n - 1.0)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            fy, fx = sy - y0, sx - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def test_builder_examples_are_the_sklearn_digits(cfg):
    raw = sklearn.datasets.load_digits()
    train, test = read_split(cfg, "train"), read_split(cfg, "test")
    assert (len(train["label"]), len(test["label"])) == (1437, 360)
    indices = np.concatenate([train["index"], test["index"]])
    np.testing.assert_array_equal(np.sort(indices), np.arange(1797))
    # Stratified: each class holds its share of the 360 test examples, to within one.
    share = np.bincount(raw.target) * 360 / 1797
    assert np.all(np.abs(np.bincount(test["label"], minlength=10) - share) < 1)
    for split in (train, test):
        np.testing.assert_array_equal(split["label"], raw.target[split["index"]])
    images = np.concatenate([train["image"], test["image"]])
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    for k in range(0, 1797, 97):
        want = bilinear_upsample(raw.images[indices[k]] * 255 / 16, 32)
        np.testing.assert_allclose(images[k, ..., 0], want, atol=0.51)


def test_rebuild_gives_identical_splits(cfg, tmp_path):
    again = dataclasses.replace(cfg, data_dir=str(tmp_path))
    for split in ("train", "test"):
        a, b = read_split(cfg, split), read_split(again, split)
        np.testing.assert_array_equal(np.sort(a["index"]), np.sort(b["index"]))
        order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
        np.testing.assert_array_equal(a["image"][order_a], b["image"][order_b])
    train, test = digits.split_indices(sklearn.datasets.load_digits().target)
    assert (len(train), len(test)) == (1437, 360) and not set(train) & set(test)


def test_input_config_boundary():
    with pytest.raises(ValueError, match="Unknown data config keys"):
        data.InputConfig.from_config({"name": "digits", "imgae_size": 32})
    with pytest.raises(ValueError, match="crop_pct"):
        data.InputConfig(crop_pct=1.5)


def test_train_batches_are_normalised_digits(cfg):
    plain = dataclasses.replace(
        cfg, inception_crop=False, flip=False, label_smoothing=0.0, mean=MEAN, std=STD
    )
    train = read_split(cfg, "train")
    known = collections.defaultdict(set)
    for image, label in zip(train["image"], train["label"]):
        known[image.tobytes()].add(label)
    batch = next(data.train_iterator(plain, global_batch_size=32, seed=0))
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32, 10) and batch["label"].dtype == np.float32
    pixels = (batch["image"] * np.array(STD) + np.array(MEAN)) * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)
    np.testing.assert_array_equal(np.sort(batch["label"], axis=1)[:, -2:], [[0, 1]] * 32)
    for image, label in zip(np.round(pixels).astype(np.uint8), batch["label"]):
        assert np.argmax(label) in known[image.tobytes()]


def test_train_label_smoothing_and_two_processes(cfg):
    batch = next(data.train_iterator(cfg, global_batch_size=64, seed=0, process_count=2))
    assert batch["image"].shape == (32, 32, 32, 3)
    np.testing.assert_allclose(np.sort(batch["label"], axis=1)[:, -2:], [[0.01, 0.91]] * 32)
    with pytest.raises(ValueError, match="multiple of the process count"):
        data.train_iterator(cfg, global_batch_size=63, seed=0, process_count=2)


def test_augmented_train_is_deterministic_and_mixed(cfg):
    # RandAugment in a pipeline runs in test_data_imagenet; its seeding in test_data_ops.
    aug = dataclasses.replace(cfg, flip=True, mixup_alpha=0.8, cutmix_alpha=1.0)
    first, second, other = (
        data.train_iterator(aug, global_batch_size=16, seed=s) for s in (1, 1, 2)
    )
    for _ in range(2):
        a, b, c = next(first), next(second), next(other)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        assert not np.array_equal(a["image"], c["image"])
        assert a["image"].shape == (16, 32, 32, 3) and np.all(np.isfinite(a["image"]))
        np.testing.assert_allclose(a["label"].sum(1), 1.0, rtol=1e-5)
        assert np.all(a["image"] >= -1.0 - 1e-6) and np.all(a["image"] <= 1.0 + 1e-6)
    assert np.any(np.sort(a["label"], axis=1)[:, -2] > 0.02)  # two classes in some label


def multiset(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
    return collections.Counter((im.tobytes(), int(lb)) for im, lb in zip(images, labels))


def eval_examples(batches: list[dict]) -> collections.Counter:
    keep = [(b["image"][b["mask"]], b["label"][b["mask"]]) for b in batches]
    images = np.concatenate([k[0] for k in keep]) * 0.5 + 0.5
    return multiset(np.round(images * 255).astype(np.uint8), np.concatenate([k[1] for k in keep]))


def test_eval_covers_every_example_once(cfg):
    batches = list(data.eval_iterator(cfg, "test", global_batch_size=64))
    assert len(batches) == 6  # ceil(360 / 64)
    for b in batches:
        assert b["image"].shape == (64, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
    assert batches[-1]["mask"].sum() == 360 - 5 * 64
    assert not np.any(batches[-1]["mask"][360 - 5 * 64 :])
    test = read_split(cfg, "test")
    assert eval_examples(batches) == multiset(test["image"], test["label"])
    assert data.num_examples(cfg, "test") == 360


def test_eval_two_processes_stay_in_lockstep(cfg):
    # 101 examples over 2 processes: 51 + 50, local batch 10 -> both yield 6 batches.
    parts = [
        list(data.eval_iterator(cfg, "test[:101]", global_batch_size=20, process_index=p,
                                process_count=2))
        for p in range(2)
    ]  # fmt: skip
    assert [len(p) for p in parts] == [6, 6]
    assert [int(sum(b["mask"].sum() for b in p)) for p in parts] == [51, 50]
    assert not parts[1][-1]["mask"].any()  # a fully padded batch keeps process 1 in step
    test = read_split(cfg, "test[:101]")
    assert eval_examples(parts[0] + parts[1]) == multiset(test["image"], test["label"])


def test_train_stream_from_start_step_continues_the_same_stream(cfg):
    """Resuming: the stream started at step s equals the full stream from its batch s on,
    across an epoch boundary (1437 / 2 processes / 100 per batch -> 7.2 batches an epoch)."""
    kw = dict(global_batch_size=200, seed=3, process_count=2, process_index=1)
    full = data.train_iterator(cfg, **kw)
    reference = [next(full) for _ in range(10)]
    resumed = data.train_iterator(cfg, start_step=6, **kw)
    for want in reference[6:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
