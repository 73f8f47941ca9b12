"""evaluate_checkpoint: importable and callable without flags, picks the newest (or the
asked) committed step, evaluates its weights on every example once, refuses another
model's checkpoint in one sentence."""

import os

import jax
import numpy as np
import optax
import pytest
from conftest import load_config

from hybrid_attn import checkpoint, evaluate, sharding, train
from hybrid_attn.data import input_pipeline
from hybrid_attn.models.build import build_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir holding steps 1 and 2 of a tiny CoAtNet (different weights)."""
    tmp = tmp_path_factory.mktemp("eval")
    c = load_config("coatnet0", "digits")
    c.model.update(depths=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8, head_dim=8)
    c.data.data_dir = str(tmp / "data")
    c.sharding.num_devices = 1  # one of the 8 fake devices, for the writes and the evaluations
    model = build_model(c)
    mesh = sharding.config_mesh(sharding.ShardingConfig.from_config(c.sharding))
    ckpt = checkpoint.Checkpointer(str(tmp / "run"), meta={"model_name": c.model_name})
    first, _ = train.create_train_state(
        model, optax.sgd(0.1), jax.random.PRNGKey(0), (1, 32, 32, 3), mesh, ema=False)
    states = {1: first, 2: first.replace(
        params=jax.tree_util.tree_map(lambda x: -2.0 * x, first.params))}
    for step, state in states.items():
        ckpt.save(step, state)
    ckpt.close()
    return c, str(tmp / "run"), states


def _reference_accuracy(c, state) -> tuple[float, int]:
    """Plain loop: apply the model batch by batch, count correct unmasked examples."""
    apply = jax.jit(lambda v, x: build_model(c).apply(v, x, train=False))
    cfg = input_pipeline.InputConfig.from_config(c.data)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    correct = seen = 0
    for batch in input_pipeline.eval_iterator(cfg, "test", global_batch_size=128):
        logits = np.asarray(apply(variables, batch["image"]))
        keep = batch["mask"].astype(bool)
        correct += int((logits.argmax(-1) == batch["label"])[keep].sum())
        seen += int(keep.sum())
    return correct / seen, seen


@pytest.mark.slow
def test_newest_and_asked_steps(run):
    c, workdir, states = run
    newest = evaluate.evaluate_checkpoint(c, workdir)
    assert (newest["step"], newest["split"], newest["num_examples"]) == (2, "test", 360)
    first = evaluate.evaluate_checkpoint(c, workdir, step=1)
    assert first["step"] == 1
    one = os.path.join(workdir, "checkpoints", "1")
    assert str(evaluate.find_checkpoint(one)) == str(evaluate.find_checkpoint(workdir, 1))
    for result, step in ((newest, 2), (first, 1)):
        accuracy, seen = _reference_accuracy(c, states[step])
        assert seen == 360 and result["accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_bad_requests_are_one_sentence(run, tmp_path):
    c, workdir, _ = run
    with pytest.raises(FileNotFoundError, match=r"No step 7 .*saved steps: \[1, 2\]"):
        evaluate.evaluate_checkpoint(c, workdir, step=7)
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        evaluate.evaluate_checkpoint(c, str(tmp_path))
    other = c.copy_and_resolve_references()
    other.model_name = "coatnet_1"
    with pytest.raises(checkpoint.CheckpointMismatchError, match="coatnet_0.*coatnet_1"):
        evaluate.evaluate_checkpoint(other, workdir)
