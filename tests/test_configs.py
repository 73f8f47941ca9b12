"""Experiment configs: every file loads in both modes, names a registered model, passes the
typed boundary and states its paper's recipe; bad arguments and overrides fail in one line
naming what was expected."""

import glob
import os

import pytest
from conftest import CONFIG_DIR, config_module, load_config

from hybrid_attn import config_lib, optim, train
from hybrid_attn.data import input_pipeline
from hybrid_attn.models import list_models
from hybrid_attn.models.build import build_model

ROOT = os.path.dirname(CONFIG_DIR)
FAMILY_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "common_*.py")))
EXPERIMENTS = sorted(os.path.basename(p)[:-3]
                     for p in set(glob.glob(os.path.join(CONFIG_DIR, "*.py"))) - set(FAMILY_FILES))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_loads_and_converts(name):
    module = config_module(name)
    assert "Command:" in module.__doc__ and ":digits" in module.__doc__
    for arg in ("", "digits"):
        c = module.get_config(arg)
        assert c.model_name in list_models()
        config_lib.check(c)
        build_model(c)  # model overrides (and the quick start's) are fields of the model
        assert c.data.name == ("digits" if arg else "imagenet2012")
        assert c.batch_size % 8 == 0  # splits over 8 devices (and the 8-device tests)


def test_family_files_are_not_experiments():
    assert len(FAMILY_FILES) == 4
    for path in FAMILY_FILES:
        module = config_module(os.path.basename(path)[:-3])
        assert not hasattr(module, "get_config") and module.__doc__


def test_every_model_family_has_configs():
    names = {load_config(n).model_name for n in EXPERIMENTS}
    for model in ["coatnet_0", "coatnet_4", "resnet50", "botnet50", "botnet_s1_t7",
                  "sasa_resnet26", "sasa_resnet50", "twins_pcpvt_s", "twins_svt_l"]:
        assert model in names


# The papers' ImageNet recipes (paper_tables.md and each file's docstring): optimiser,
# peak lr, end lr, warmup (steps, epochs), weight decay, clip, EMA, epochs, batch,
# RandAugment (layers, magnitude), mixup, cutmix, label smoothing, resolution, drop path.
COATNET = ("adamw", 1e-3, 1e-5, (10_000, -1), 0.05, 1.0, 0.0, 300, 4096, (2, 15), 0.8, 0.0)
RESNET = ("sgd", 1.6, 0.0, (0, 5), 1e-4, 0.0, 0.0, 90, 4096, (0, 0), 0.0, 0.0)
BOTNET_S1 = ("sgd", 1.6, 0.0, (0, 5), 4e-5, 0.0, 0.9999, 350, 4096)
TWINS = ("adamw", 1e-3, 1e-5, (0, 5), 0.05, 5.0, 0.0, 300, 1024, (2, 9), 0.8, 1.0)
RECIPES = {
    **{f"coatnet{i}": (*COATNET, 0.1, 224, dp) for i, dp in enumerate([.2, .3, .5, .7, .7])},
    "resnet50": (*RESNET, 0.1, 224, None),
    "botnet50": (*RESNET, 0.1, 224, None),
    **{f"sasa_resnet{d}": (*RESNET[:6], 0.9999, *RESNET[7:], 0.1, 224, None)
       for d in (26, 38, 50)},
    **{f"botnet_s1_t{t}": (*BOTNET_S1, (2, ra), 0.0, 0.0, 0.1, res, dp)
       for t, res, ra, dp in [(3, 224, 10, 0.0), (4, 224, 10, 0.1), (5, 256, 15, 0.1),
                              (6, 320, 15, 0.1), (7, 384, 15, 0.2)]},
    **{f"twins_{k}_{s}": (*TWINS, 0.1, 224, dp) for k in ("pcpvt", "svt")
       for s, dp in (("s", .2), ("b", .3), ("l", .5))},
}


def test_recipes_cover_every_experiment():
    assert sorted(RECIPES) == EXPERIMENTS


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_imagenet_recipe_is_the_papers(name):
    c = load_config(name)
    o, d = c.optim, c.data
    assert (o.name, o.learning_rate, o.end_learning_rate, (o.warmup_steps, o.warmup_epochs),
            o.weight_decay, o.grad_clip_norm, o.ema_decay, c.num_epochs, c.batch_size,
            (d.randaugment_layers, d.randaugment_magnitude), d.mixup_alpha, d.cutmix_alpha,
            d.label_smoothing, d.image_size, c.model.get("drop_path_rate")) == RECIPES[name]
    assert (o.schedule, d.inception_crop, d.flip, d.crop_pct) == ("cosine", True, True, 0.875)
    assert (d.num_classes, c.compute_dtype, c.num_train_steps) == (1000, "float32", -1)
    if o.name == "sgd":
        assert (o.momentum, o.nesterov) == (0.9, True)


# Quick start: epochs per file (each docstring states them) and its model overrides.
DIGITS = {**{f"coatnet{i}": (8, {"drop_path_rate": 0.1}) for i in range(5)},
          "resnet50": (14, {}), "botnet50": (14, {}),
          **{f"sasa_resnet{d}": (30, {"block_size": 8, "row_chunk": None}) for d in (26, 38, 50)},
          **{f"botnet_s1_t{t}": (14, {"drop_path_rate": 0.0}) for t in range(3, 8)},
          **{f"twins_{n}": (50, {"drop_path_rate": 0.1})
             for n in ("pcpvt_s", "pcpvt_b", "pcpvt_l", "svt_s", "svt_b", "svt_l")}}


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_digits_quick_start(name):
    c = load_config(name, "digits")
    d, o = c.data, c.optim
    epochs, model = DIGITS[name]
    assert (d.name, d.train_split, d.eval_split, d.num_classes, d.image_size) == (
        "digits", "train", "test", 10, 32)
    assert (d.flip, d.randaugment_layers, d.mixup_alpha, d.cutmix_alpha, d.cache) == (
        False, 0, 0.0, 0.0, True)
    assert (d.inception_min_area, d.crop_pct, d.mean, d.label_smoothing) == (
        0.6, 1.0, (0.5, 0.5, 0.5), 0.1)
    assert (c.batch_size, c.eval_batch_size, c.num_epochs) == (64, 128, epochs)
    assert (o.name, o.learning_rate, o.warmup_epochs, o.weight_decay, o.ema_decay) == (
        "adamw", 1e-3, 1.0, 0.05, 0.0)
    for key, value in model.items():
        assert c.model[key] == value
    imagenet = load_config(name)
    assert c.model_name == imagenet.model_name
    assert {k: v for k, v in c.model.items() if k not in model} == {
        k: v for k, v in imagenet.model.items() if k not in model}


def test_standard_arguments():
    c = load_config("coatnet0", "digits,res=48,batch=16,epochs=2,steps=5,bf16")
    assert (c.data.image_size, c.batch_size, c.num_epochs, c.num_train_steps,
            c.compute_dtype) == (48, 16, 2.0, 5, "bfloat16")
    fine_tune = load_config("coatnet0", "res=384,bf16")
    assert fine_tune.data.image_size == 384 and fine_tune.compute_dtype == "bfloat16"
    assert fine_tune.batch_size == 4096 and fine_tune.num_train_steps == -1


def test_defaults_are_the_typed_dataclasses():
    c = config_lib.defaults("coatnet_0")
    assert input_pipeline.InputConfig.from_config(c.data) == input_pipeline.InputConfig()
    assert optim.OptimConfig.from_config(c.optim, 1) == optim.OptimConfig()
    assert config_lib.TrainConfig.from_config(c) == config_lib.TrainConfig("coatnet_0")
    c.data.data_dir = "/tmp/tfds"  # None defaults stay typed, so --config overrides work


def test_misspelt_keys_are_errors():
    c = load_config("coatnet0")
    c.optim.warmup_epoch = 5.0
    with pytest.raises(config_lib.ConfigError,
                       match=r"Unknown optim config keys \['warmup_epoch'\]"):
        config_lib.check(c)
    c = load_config("coatnet0")
    c.num_epoch = 3
    with pytest.raises(config_lib.ConfigError, match=r"Unknown config keys \['num_epoch'\]"):
        config_lib.check(c)


def test_argument_string_errors_name_the_valid_keys():
    with pytest.raises(ValueError, match="Unknown config argument 'digit'.*digits"):
        load_config("coatnet0", "digit")
    with pytest.raises(ValueError, match="'res' expects int, got 'big'"):
        load_config("coatnet0", "res=big")


@pytest.mark.parametrize("arg,message", [
    # Before: batch=0 was read as "not given" and trained with the quick start's 64.
    ("digits,batch=0", "'batch' must be >= 1, got 0"),
    ("digits,batch=-8", "'batch' must be >= 1, got -8"),
    # Before: steps=-5 was taken as "use the epochs" and ran the full schedule.
    ("digits,steps=-5", "'steps' must be >= 1, got -5"),
    ("digits,steps=0", "'steps' must be >= 1, got 0"),
    ("digits,epochs=0", "'epochs' must be > 0"),
    ("res=0", "'res' must be >= 1"),
])
def test_bad_argument_values_are_one_line_errors(arg, message):
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        load_config("coatnet0", arg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("section,key,value,message", [
    # Before: learning_rate=0 died in make_schedule with a bare ZeroDivisionError.
    ("optim", "learning_rate", 0.0, "need learning_rate > 0"),
    ("optim", "learning_rate", -1e-3, "need learning_rate > 0"),
    ("optim", "ema_decay", 1.0, "0 <= ema_decay < 1"),
    ("optim", "name", "adam", "name adamw or sgd"),
    (None, "batch_size", 0, "need batch_size >= 1"),
    (None, "num_train_steps", -5, "num_train_steps >= 1, or -1"),
    ("data", "crop_pct", 1.5, "0 < crop_pct <= 1"),
])
def test_bad_overrides_fail_at_the_typed_boundary(tmp_path, section, key, value, message):
    """What ``--config.<section>.<key>=<value>`` does to the final config: the trainer
    refuses it in one line before touching the workdir or the dataset."""
    c = load_config("coatnet0", "digits")
    (c[section] if section else c)[key] = value
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        train.train_and_evaluate(c, str(tmp_path / "workdir"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "workdir")


def test_missing_imagenet_stops_before_training_with_instructions(tmp_path):
    c = load_config("coatnet0")
    c.data.data_dir = str(tmp_path)
    with pytest.raises(input_pipeline.DatasetNotPreparedError,
                       match=r"(?s)downloads/manual.*configs/coatnet0.py:digits"):
        train.train_and_evaluate(c, str(tmp_path / "workdir"))
    assert not os.path.exists(tmp_path / "workdir" / "checkpoints")
