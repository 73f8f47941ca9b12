"""Trainer: gradient accumulation, a diverging run stopping cleanly, and a SIGTERM during
the final save."""

import os
import re
import signal

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import tiny_config
from test_train import TinyNet

from hybrid_attn import checkpoint, sharding, train


class Mlp(nn.Module):
    """No batch statistics or dropout: gradient accumulation must equal the big batch."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.gelu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _steps(grad_accum_steps, batches):
    model = Mlp()
    schedule = optax.linear_schedule(0.0, 0.1, 4)  # warmup: the count used is visible
    tx = optax.adamw(schedule, weight_decay=0.01)
    rng = jax.random.PRNGKey(0)
    mesh = sharding.make_mesh()
    state, shardings = train.create_train_state(model, tx, rng, (1, 4, 4, 3), mesh, ema=True)
    step = train.make_train_step(model, tx, schedule, rng, 0.9, shardings, mesh,
                                 grad_accum_steps=grad_accum_steps)
    lrs, losses = [], []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
        m = metrics.compute()
        lrs.append(float(m["learning_rate"]))
        losses.append(float(m["loss"]))
    return jax.device_get(state), lrs, losses


def test_grad_accumulation_equals_the_large_batch_step():
    """4 microbatches of 16 give the update of one batch of 64 (rtol 1e-5, atol 1e-6), and
    the schedule, EMA and step count optimizer updates, not microbatches."""
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(64, 4, 4, 3)).astype(np.float32),
                "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)]}
               for _ in range(2)]
    big, lr_big, loss_big = _steps(1, batches)
    acc, lr_acc, loss_acc = _steps(4, batches)
    assert int(acc.step) == 2
    assert lr_acc == lr_big == pytest.approx([0.0, 0.025])
    np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(acc), jax.tree_util.tree_leaves(big)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Not trivially equal: the second update moved the parameters.
    first, _, _ = _steps(1, batches[:1])
    assert not np.allclose(first.params["Dense_0"]["kernel"], big.params["Dense_0"]["kernel"])


def _config(tmp_path, steps):
    c = tiny_config.get_config(f"steps={steps}")
    c.data.data_dir = str(tmp_path / "data")
    c.log_every_steps, c.checkpoint_every_steps = 1, 1
    c.optim.grad_clip_norm = 0.0
    c.sharding.num_devices = 1  # one of the 8 fake devices (faster; the mesh is not tested here)
    return c


def test_diverging_run_stops_naming_the_step_and_keeps_good_checkpoints(monkeypatch, tmp_path):
    """Finding 1: learning_rate 1e30 used to train on with NaN loss, write NaN checkpoints
    over the good ones (keep-last-N) and exit 0 with a final accuracy."""
    monkeypatch.setattr(train, "build_model", lambda c: TinyNet(c.data.num_classes))
    c = _config(tmp_path, 8)
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = 1e30, 0, "constant"
    c.keep_checkpoints = 2
    with pytest.raises(train.NonFiniteLossError, match=r"at step \d") as e:
        train.train_and_evaluate(c, str(tmp_path / "run"))
    bad = int(str(e.value).split("at step ")[1].split(":")[0])
    assert 1 < bad < 8
    saved = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints"))
    assert saved and max(saved) < bad
    for s in saved:
        loaded = checkpoint.load_variables(str(tmp_path / "run" / "checkpoints" / str(s)))
        assert checkpoint.is_finite({k: v for k, v in loaded.items() if k != "meta"})


def test_sigterm_during_the_final_save_neither_kills_nor_loses_it(monkeypatch, tmp_path):
    """Finding 4: the previous SIGTERM handler was restored before waiting for the async
    final save, so a SIGTERM then killed the process (rc 143) mid-save."""
    monkeypatch.setattr(train, "build_model", lambda c: TinyNet(c.data.num_classes))

    class Killed(Exception):
        pass

    def previous_handler(signum, frame):  # stands in for the default action (exit 143)
        raise Killed

    original_close = checkpoint.Checkpointer.close

    def close_after_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the final save is pending
        original_close(self)

    monkeypatch.setattr(checkpoint.Checkpointer, "close", close_after_sigterm)
    old = signal.signal(signal.SIGTERM, previous_handler)
    try:
        result = train.train_and_evaluate(_config(tmp_path, 3), str(tmp_path / "run"))
        assert signal.getsignal(signal.SIGTERM) is previous_handler  # restored afterwards
    finally:
        signal.signal(signal.SIGTERM, old)
    assert result["num_examples"] == 360
    assert "3" in os.listdir(tmp_path / "run" / "checkpoints")
    loaded = checkpoint.load_variables(str(tmp_path / "run" / "checkpoints" / "3"))
    assert loaded["meta"]["model_name"] == "resnet50"


def _entry_parameter_copies(hlo: str) -> list[str]:
    """Names of the compiled program's parameters that it copies before use."""
    entry = hlo[hlo.index("ENTRY"):]
    params = re.findall(r"%([\w.\-]+) = \S+ parameter\(", entry)
    return [p for p in params if re.search(r"copy\(%" + re.escape(p) + r"\)", entry)]


def test_step_updates_the_donated_parameters_in_place():
    """Every parameter's update waits for the step's finiteness check, so XLA writes the
    donated buffers in place (only the step counter, read after its increment, is copied),
    where a plain optax update may run before its layer's input gradient and is copied."""
    from hybrid_attn.models.twins import Twins
    model = Twins(depths=(1, 1, 2, 1), embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 3, 4),
                  mlp_ratios=(4, 4, 4, 4), num_classes=5)
    tx = optax.adamw(1e-3, weight_decay=0.01)  # no gradient clipping
    rng = jax.random.PRNGKey(0)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, shardings = train.create_train_state(model, tx, rng, (1, 56, 56, 3), mesh, ema=False)
    batch = {"image": np.zeros((2, 56, 56, 3), np.float32), "label": np.zeros((2, 5), np.float32)}
    step = train.make_train_step(model, tx, lambda s: 1e-3, rng, 0.0, shardings, mesh)
    copied = _entry_parameter_copies(step.lower(state, batch).compile().as_text())
    assert all("step" in name for name in copied), copied

    def plain(state, batch):  # the check can fail: the same update without the select
        grads = jax.grad(lambda p: optax.softmax_cross_entropy(
            model.apply({"params": p}, batch["image"], train=True), batch["label"]).mean())(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    plain_copies = _entry_parameter_copies(
        jax.jit(plain, donate_argnums=0).lower(state, batch).compile().as_text())
    assert len(plain_copies) > 10


def test_a_non_finite_step_leaves_the_parameters_unchanged():
    model = Mlp()
    tx = optax.adamw(1e-2)
    rng = jax.random.PRNGKey(0)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, shardings = train.create_train_state(model, tx, rng, (1, 4, 4, 3), mesh, ema=False)
    step = train.make_train_step(model, tx, lambda s: 1e-2, rng, 0.0, shardings, mesh)
    before = jax.device_get(state.params)
    image = np.ones((4, 4, 4, 3), np.float32)
    label = np.eye(10, dtype=np.float32)[:4]
    state, metrics = step(state, {"image": image, "label": label})
    assert int(metrics.compute()["first_nonfinite_step"]) == 0  # a finite step moves them
    moved = jax.device_get(state.params)
    assert not np.allclose(moved["Dense_0"]["kernel"], before["Dense_0"]["kernel"])
    image[0, 0, 0, 0] = np.nan
    state, metrics = step(state, {"image": image, "label": label})
    assert int(metrics.compute()["first_nonfinite_step"]) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), moved)
