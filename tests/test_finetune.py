"""Fine-tuning from imported timm weights: a new head when the class count differs (logged),
position tables resized to the new resolution, every other weight kept, and a digits run
from the imported checkpoint that learns."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIG_DIR
from flax import traverse_util

from hybrid_attn import checkpoint, config_lib, finetune, train
from hybrid_attn.convert.__main__ import convert_file
from hybrid_attn.convert.pretrained import model_from_meta

GOLDENS = pathlib.Path(__file__).parent / "goldens"


def load_finetune_config(arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "finetune_digits", pathlib.Path(CONFIG_DIR) / "finetune" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> str:
    """The timm round-trip golden (reduced CoAtNet, 1000 classes, 224) as a checkpoint."""
    workdir = tmp_path_factory.mktemp("finetune") / "coatnet"
    sizes = json.loads(str(np.load(GOLDENS / "roundtrip_coatnet.npz")["config"]))
    return convert_file("coatnet_0_224", str(GOLDENS / "roundtrip_coatnet.safetensors"),
                        str(workdir), sizes)


def test_new_head_resized_tables_and_kept_weights(imported, caplog):
    meta = finetune.read_meta(imported)
    model = model_from_meta(meta, num_classes=10)
    shape = (1, 32, 32, 3)
    fresh = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x, train=False))(
        jnp.zeros(shape))
    with caplog.at_level(logging.WARNING):
        weights, kind = finetune.load_pretrained(imported, fresh, model, shape)
    assert kind == "weights"
    assert "1000-class classifier and this run has 10 classes: starting from a newly " \
           "initialised head" in caplog.text
    np.testing.assert_array_equal(weights["params"]["head"]["kernel"],
                                  fresh["params"]["head"]["kernel"])
    loaded = traverse_util.flatten_dict(jax.device_get(weights["params"]))
    original = traverse_util.flatten_dict(checkpoint.load_variables(imported)["params"])
    resized = [p for p in original if original[p].shape != loaded[p].shape]
    # Only the transformer stages' bias tables change: S3 14x14 -> 2x2, S4 7x7 -> 1x1.
    assert resized and all(p[-1] == "relative_bias_table" for p in resized if p[0] != "head")
    assert {loaded[p].shape[:2] for p in resized if p[0] != "head"} == {(3, 3), (1, 1)}
    for path, value in original.items():
        if path[0] != "head" and value.shape == loaded[path].shape:
            np.testing.assert_array_equal(loaded[path], value)
    assert set(original) == set(loaded)


def test_config_needs_an_imported_checkpoint(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="needs init=<workdir>/checkpoints/<step>"):
        load_finetune_config("steps=3")
    with pytest.raises(FileNotFoundError, match="No checkpoint metadata"):
        load_finetune_config(f"init={tmp_path}/checkpoints/0")


@pytest.mark.slow
def test_finetuning_on_digits_learns(imported, tmp_path):
    c = load_finetune_config(f"init={imported},steps=80")
    assert (c.model_name, c.data.mean, c.data.num_classes) == ("coatnet_0", (0.5,) * 3, 10)
    assert c.data.image_size == 32  # the weights were made at 224
    c.optim.learning_rate = 3e-3  # random "pretrained" weights: train harder than real ones
    c.eval_every_steps = c.checkpoint_every_steps = 0
    c.sharding.num_devices = 1  # 2x faster than conftest's 8 fake devices on 2 cores
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert result["num_examples"] == 360
    assert result["accuracy"] > 0.4  # chance is 0.1; 0.67 measured
