"""The imagenet2012 path without ImageNet: the not-prepared error and a mock_data run."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hybrid_attn import data

SPLITS = {"train": 24, "validation": 10}


def test_missing_dataset_error_says_how_to_prepare(tmp_path):
    cfg = data.InputConfig(name="imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.num_examples(cfg, "train")
    message = str(e.value)
    assert f"{tmp_path}/downloads/manual/" in message
    assert "ILSVRC2012_img_train.tar" in message and "tfds build imagenet2012" in message
    assert "--config=configs/coatnet0.py:digits" in message
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(data.DatasetNotPreparedError):
        data.train_iterator(cfg, global_batch_size=8, seed=0)


@pytest.fixture
def mock_imagenet(tmp_path):
    """imagenet2012 metadata (split sizes) in tmp_path, random JPEG examples from mock_data."""
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name="imagenet2012"
    )
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=name,
                    shard_lengths=[n],
                    num_bytes=0,
                    filename_template=template.replace(split=name, filetype_suffix="tfrecord"),
                )
                for name, n in SPLITS.items()
            ]
        )
    )
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with tfds.testing.mock_data(
        num_examples=SPLITS["validation"],
        policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=str(tmp_path),
    ):
        yield data.InputConfig(
            name="imagenet2012", data_dir=str(tmp_path), image_size=40, shuffle_buffer=8
        )


def test_imagenet_recipe_on_mock_data(mock_imagenet):
    cfg = dataclasses.replace(
        mock_imagenet,
        randaugment_layers=2,
        randaugment_magnitude=15,
        mixup_alpha=0.8,
        label_smoothing=0.1,
    )
    assert data.num_examples(cfg, "train") == SPLITS["train"]
    batch = next(data.train_iterator(cfg, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 40, 40, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 1000)
    np.testing.assert_allclose(batch["label"].sum(1), 1.0, rtol=1e-5)
    # Pixels in [0, 255] normalised with the ImageNet mean/std, mixed convexly.
    lo = (0 - np.array(cfg.mean)) / np.array(cfg.std)
    hi = (1 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.all(batch["image"] >= lo - 1e-5) and np.all(batch["image"] <= hi + 1e-5)
    batches = list(data.eval_iterator(cfg, "validation", global_batch_size=8))
    assert [int(b["mask"].sum()) for b in batches] == [8, 2]
    assert batches[0]["image"].shape == (8, 40, 40, 3)
    assert np.all(batches[0]["label"] < 1000)
