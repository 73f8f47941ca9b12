"""Predictor: timm's evaluation transform reproduced, ImageNet class names in tfds' label
order, the printed top-5 of an imported checkpoint, and bad input in one line."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import softmax
from PIL import Image

from hybrid_attn import predict
from hybrid_attn.convert import names
from hybrid_attn.convert.__main__ import convert_file

GOLDENS = pathlib.Path(__file__).parent / "goldens"
IMAGES = [GOLDENS / "roundtrip_landscape.png", GOLDENS / "roundtrip_portrait.png"]


def test_preprocess_is_timms_eval_transform():
    golden = np.load(GOLDENS / "roundtrip_coatnet.npz")["input"]
    prep = names.preprocessing("coatnet_0_224", "untrained")
    ours = np.stack([predict.preprocess(Image.open(p), prep) for p in IMAGES])
    np.testing.assert_allclose(ours, golden, atol=1e-5)


def test_preprocess_rejects_what_it_cannot_reproduce():
    prep = {**names.preprocessing("resnet50", "a1_in1k"), "crop_mode": "squash"}
    with pytest.raises(ValueError, match="centre crop.*'squash'"):
        predict.preprocess(Image.open(IMAGES[0]), prep)


def test_class_names_follow_tfds_imagenet2012_labels():
    wnids = [line.split("\t")[0] for line in predict.CLASS_NAMES_FILE.read_text().splitlines()]
    labels = pathlib.Path(tfds.core.tfds_path("datasets/imagenet2012/labels.txt"))
    assert wnids == labels.read_text().split()
    names_ = predict.imagenet_class_names()
    assert len(names_) == 1000 and names_[0] == "tench" and names_[207] == "golden retriever"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("predict") / "coatnet"
    sizes = json.loads(str(np.load(GOLDENS / "roundtrip_coatnet.npz")["config"]))
    convert_file("coatnet_0_224", str(GOLDENS / "roundtrip_coatnet.safetensors"),
                 str(workdir), sizes)
    return str(workdir)


def test_cli_prints_timms_top5(imported, capsys):
    predict.main(["--checkpoint", imported, *map(str, IMAGES)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "coatnet_0 (coatnet_0_224.untrained)"
    probs = softmax(np.load(GOLDENS / "roundtrip_coatnet.npz")["logits"].astype(np.float64))
    class_names = predict.imagenet_class_names()
    for i, path in enumerate(IMAGES):
        block = lines[1 + 6 * i: 7 + 6 * i]
        assert block[0] == str(path)
        expected = [f"  {probs[i, c]:7.2%}  {class_names[c]}" for c in np.argsort(-probs[i])[:5]]
        assert block[1:] == expected


@pytest.mark.parametrize("case", ["missing image", "not an image", "no checkpoint"])
def test_bad_input_is_one_line(case, imported, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    args = {"missing image": ["--checkpoint", imported, str(tmp_path / "none.png")],
            "not an image": ["--checkpoint", imported, str(text)],
            "no checkpoint": ["--checkpoint", str(tmp_path), str(IMAGES[0])]}[case]
    message = {"missing image": "No image file at", "not an image": "is not an image PIL",
               "no checkpoint": "No checkpoint in"}[case]
    with pytest.raises(SystemExit) as e:
        predict.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
