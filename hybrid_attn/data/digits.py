"""The embedded ``digits`` dataset: scikit-learn's 1,797 real handwritten digits as a TFDS dataset.

The 8x8 scans (values 0..16) ship inside the scikit-learn package, so the dataset builds
offline in a second. Each scan is rescaled to 0..255, upsampled bilinearly to 32x32 and
stored as a PNG-encoded uint8 RGB image, so it flows through exactly the same
decode / crop / resize pipeline as ImageNet. The split is fixed, seeded and stratified:
1,437 ``train`` and 360 ``test`` examples, identical on every build.

Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository, 1998 (scikit-learn ships its test part).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import sklearn.datasets
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
TEST_SIZE = 360
SPLIT_SEED = 0
_MAX_SCAN_VALUE = 16.0


def split_indices(
    labels: np.ndarray, test_size: int = TEST_SIZE, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split into sorted (train, test) index arrays.

    Each class contributes its share of ``test_size`` (largest-remainder rounding, so the
    total is exact); which examples of a class go to test is a seeded permutation.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * test_size / len(labels)
    take = np.floor(quota).astype(np.int64)
    by_remainder = np.argsort(-(quota - take), kind="stable")
    take[by_remainder[: test_size - take.sum()]] += 1
    test = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
        )
    )
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 RGB [N, 32, 32, 3] (bilinear, half-pixel centres) and labels."""
    raw = sklearn.datasets.load_digits()
    scans = raw.images.astype(np.float32) * (255.0 / _MAX_SCAN_VALUE)
    resized = tf.image.resize(scans[..., None], (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")
    grey = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
    return np.repeat(grey, 3, axis=-1), raw.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the embedded digits; ``download_and_prepare`` never touches the network."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32 RGB PNG, stratified 1437/360 train/test split (seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    # Row of sklearn.datasets.load_digits(), to trace an example back.
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Everything needed ships with scikit-learn.
        images, labels = load_images()
        train, test = split_indices(labels)
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for i in indices:
            yield int(i), {"image": images[i], "label": labels[i], "index": np.int32(i)}
