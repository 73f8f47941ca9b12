"""Experiment configs: every file loads in both modes, names a registered model, converts
to the trainer's typed configs; the argument string and locked flags fail loudly."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from hybrid_attn import config_lib, optim, train
from hybrid_attn.data import input_pipeline
from hybrid_attn.models import list_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_converts(path):
    module = load(path)
    assert "Command:" in module.__doc__ and ":digits" in module.__doc__
    for arg in ("", "digits"):
        c = module.get_config(arg)
        assert c.model_name in list_models()
        data = input_pipeline.InputConfig.from_config(c.data)
        optim.OptimConfig.from_config(c.optim, steps_per_epoch=10)
        train.build_model(c)  # model / digits_model overrides are fields of the model
        assert data.name == ("digits" if arg else "imagenet2012")
        assert c.batch_size % 8 == 0  # splits over 8 devices (and the 8-device tests)


def test_every_model_family_has_configs():
    names = {load(p).get_config().model_name for p in CONFIGS}
    for model in ["coatnet_0", "coatnet_4", "resnet50", "botnet50", "botnet_s1_t7",
                  "sasa_resnet26", "sasa_resnet50", "twins_pcpvt_s", "twins_svt_l"]:
        assert model in names


def test_coatnet0_is_the_papers_imagenet_recipe():
    c = load(os.path.join(ROOT, "configs", "coatnet0.py")).get_config()
    assert (c.data.name, c.data.image_size, c.batch_size, c.num_epochs) == (
        "imagenet2012", 224, 4096, 300.0)
    assert (c.optim.name, c.optim.learning_rate, c.optim.weight_decay) == ("adamw", 1e-3, 0.05)
    assert c.optim.warmup_steps == 10_000 and c.optim.schedule == "cosine"
    assert (c.data.randaugment_layers, c.data.randaugment_magnitude) == (2, 15)
    assert (c.data.mixup_alpha, c.data.label_smoothing) == (0.8, 0.1)
    assert c.model.drop_path_rate == 0.2
    fine_tune = load(os.path.join(ROOT, "configs", "coatnet0.py")).get_config("res=384,bf16")
    assert fine_tune.data.image_size == 384 and fine_tune.compute_dtype == "bfloat16"


def test_misspelt_optim_key_is_an_error():
    c = config_lib.build("", model_name="coatnet_0", optim={"warmup_epoch": 5.0})
    with pytest.raises(ValueError, match=r"Unknown optim config keys \['warmup_epoch'\]"):
        optim.OptimConfig.from_config(c.optim, steps_per_epoch=10)


def test_argument_string_errors_name_the_valid_keys():
    with pytest.raises(ValueError, match="Unknown config argument 'digit'.*digits"):
        config_lib.build("digit", model_name="coatnet_0")
    with pytest.raises(ValueError, match="'res' expects int, got 'big'"):
        config_lib.build("res=big", model_name="coatnet_0")
    assert config_lib.build("digits,epochs=2,batch=16", model_name="coatnet_0").batch_size == 16


def test_locked_config_rejects_a_misspelt_override(tmp_path):
    """The real entry point: a typo in --config.* fails before anything runs."""
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_attn.main", "--config=configs/coatnet0.py:digits",
         "--config.optim.lerning_rate=0.5", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_imagenet_stops_before_training_with_instructions(tmp_path):
    c = load(os.path.join(ROOT, "configs", "coatnet0.py")).get_config()
    c.data.data_dir = str(tmp_path)
    with pytest.raises(input_pipeline.DatasetNotPreparedError,
                       match=r"(?s)downloads/manual.*configs/coatnet0.py:digits"):
        train.train_and_evaluate(c, str(tmp_path / "workdir"))
    assert not os.path.exists(tmp_path / "workdir" / "checkpoints")
