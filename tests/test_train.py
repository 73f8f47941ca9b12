"""Trainer: the action schedule, multi-device equivalence, and exact resume."""

import functools
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from hybrid_attn import optim, sharding, train, xla_cpu


class TinyNet(nn.Module):
    """Conv + BatchNorm + dropout + Dense: exercises batch_stats and the dropout rng."""

    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False, dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def test_actions_for_step_periods_and_last_step():
    kw = dict(log_every=10, eval_every=50, checkpoint_every=20)
    a = [train.actions_for_step(s, 100, **kw) for s in range(1, 101)]
    assert [s for s, x in enumerate(a, 1) if x.log] == list(range(10, 101, 10))
    assert [s for s, x in enumerate(a, 1) if x.evaluate] == [50, 100]
    assert [s for s, x in enumerate(a, 1) if x.checkpoint] == [20, 40, 60, 80, 100]
    # The last step does everything even when it is off-period; disabled periods stay off.
    last = train.actions_for_step(7, 7, log_every=5, eval_every=0, checkpoint_every=-1)
    assert last == train.Actions(log=True, evaluate=True, checkpoint=True)
    mid = train.actions_for_step(3, 7, log_every=5, eval_every=0, checkpoint_every=0)
    assert mid == train.Actions(log=False, evaluate=False, checkpoint=False)
    # A stop request checkpoints (and logs) but does not evaluate.
    stop = train.actions_for_step(3, 7, log_every=5, eval_every=5, checkpoint_every=5,
                                  stop_requested=True)
    assert stop == train.Actions(log=True, evaluate=False, checkpoint=True)


def test_schedule_warmup_and_cosine_end():
    cfg = optim.OptimConfig(learning_rate=1.0, end_learning_rate=0.01, warmup_steps=10)
    s = optim.make_schedule(cfg, 110)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(s(60), 0.01 + 0.99 * 0.5, atol=1e-4)  # cosine midpoint
    np.testing.assert_allclose(s(110), 0.01, atol=1e-6)


def test_weight_decay_mask_matrices_but_not_norms_biases_or_position_tables():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
              "norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
              "attn": {"position": {"relative_bias_table": jnp.ones((3, 3, 2))}}}
    mask = optim.decay_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False},
                    "norm": {"scale": False, "bias": False},
                    "attn": {"position": {"relative_bias_table": False}}}
    # And AdamW really leaves masked leaves undecayed when the gradient is zero.
    cfg = optim.OptimConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=0,
                            schedule="constant", grad_clip_norm=0.0)
    tx = optim.make_optimizer(cfg, optim.make_schedule(cfg, 10))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["conv"]["kernel"], 1 - 0.1 * 0.5)
    np.testing.assert_allclose(new["attn"]["position"]["relative_bias_table"], 1.0)
    np.testing.assert_allclose(new["norm"]["scale"], 1.0)


def _one_step(mesh, batch, flat_state=False):
    model = TinyNet()
    cfg = optim.OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant",
                            flat_state=flat_state)
    schedule = optim.make_schedule(cfg, 10)
    tx = optim.make_optimizer(cfg, schedule)
    rng = jax.random.PRNGKey(0)
    state, shardings = train.create_train_state(model, tx, rng, (1, 8, 8, 3), mesh, ema=True)
    step = train.make_train_step(model, tx, schedule, rng, 0.9, shardings, mesh)
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    return jax.device_get(state), {k: float(v) for k, v in metrics.compute().items()}


@pytest.mark.parametrize("flat_state", [False, True])
def test_train_step_same_on_8_devices_as_on_1(flat_state):
    assert jax.device_count() == 8, "conftest.py sets 8 fake CPU devices"
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
    state1, m1 = _one_step(sharding.make_mesh(jax.devices()[:1]), batch, flat_state)
    state8, m8 = _one_step(sharding.make_mesh(), batch, flat_state)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(state1), jax.tree_util.tree_leaves(state8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The update really moved the parameters and the BatchNorm statistics.
    assert int(state8.step) == 1
    assert float(np.abs(state8.batch_stats["BatchNorm_0"]["mean"]).sum()) > 0


def test_light_codegen_reaches_xla_and_gives_the_same_state_and_step(monkeypatch):
    mesh = sharding.make_mesh(jax.devices()[:1])
    library = xla_cpu.CPU_LIBRARY_FUSIONS
    # conftest's XLA_FLAGS set both codegen keys (-O0): a key set there wins, so the tests
    # keep -O0 and get only the library choice.
    assert train.light_compiler_options(mesh) == library
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert train.light_compiler_options(mesh) == {**library, **xla_cpu.CPU_LIGHT_CODEGEN}
    assert train.light_compiler_options(mesh, light_codegen=False) == library
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert train.light_compiler_options(mesh) == {**library,
                                                  "xla_llvm_disable_expensive_passes": True}

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    model, tx, rng = TinyNet(), optax.adamw(1e-3), jax.random.PRNGKey(0)
    init = functools.partial(train.create_train_state, model, tx, rng, (1, 8, 8, 3), mesh,
                             ema=True)
    # -O1 (the options) against the process's own -O0 flags: the same parameters.
    light, _ = init(light_codegen=True)
    plain, _ = init(light_codegen=False)
    for a, b in zip(jax.tree_util.tree_leaves(light), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The options reach XLA's compile, and only with the switch on: XLA rejects a key it
    # does not know.
    # A train step compiled both ways: the same updated state and metrics.
    batch = {"image": jax.random.normal(rng, (8, 8, 8, 3)),
             "label": jax.nn.one_hot(jnp.arange(8) % 10, 10)}
    schedule = optax.constant_schedule(1e-3)
    results = {}
    for flag in (True, False):
        state, shardings = init(light_codegen=False)
        step = train.make_train_step(model, tx, schedule, rng, 0.99, shardings, mesh,
                                     light_codegen=flag)
        results[flag] = step(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(results[True]),
                    jax.tree_util.tree_leaves(results[False])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The options reach XLA's compile, and only with the switch on: XLA rejects a key it
    # does not know.
    monkeypatch.setitem(xla_cpu.CPU_LIGHT_CODEGEN, "xla_no_such_option", True)
    with pytest.raises(Exception, match="No such compile option"):
        init(light_codegen=True)
    init(light_codegen=False)
    state, shardings = init(light_codegen=False)
    with pytest.raises(Exception, match="No such compile option"):
        train.make_train_step(model, tx, schedule, rng, 0.99, shardings, mesh)(state, batch)
    train.make_train_step(model, tx, schedule, rng, 0.99, shardings, mesh,
                          light_codegen=False)(state, batch)


def test_batch_size_must_split_over_devices():
    with pytest.raises(ValueError, match="positive multiple of the number of devices"):
        sharding.check_batch_size(12, sharding.make_mesh())


def _digits_config(data_dir: str):
    c = load_config("coatnet0", "digits,steps=6")
    c.data.data_dir = data_dir
    c.data.image_size = 16
    c.batch_size, c.eval_batch_size = 32, 64
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 0, 4
    c.optim.ema_decay = 0.9  # EMA and mixup are part of the state/stream that must resume
    c.data.mixup_alpha = 0.2
    c.sharding.num_devices = 1  # one of the 8 fake devices: the resume, not the mesh, is tested
    return c


def _saved_params(workdir, step):
    from hybrid_attn import checkpoint

    loaded = checkpoint.load_variables(os.path.join(workdir, "checkpoints", str(step)))
    assert loaded.pop("meta")["model_name"]  # the rest is arrays only
    return loaded


@pytest.mark.parametrize("flat_state", [False, True])
def test_resume_after_sigterm_matches_uninterrupted_run(monkeypatch, tmp_path, flat_state):
    """Stopped by SIGTERM midway and rerun, training ends with the same parameters,
    BatchNorm statistics and EMA, with the optimizer state per leaf or flat."""
    from hybrid_attn.data import input_pipeline

    monkeypatch.setattr(train, "build_model", lambda c: TinyNet(c.data.num_classes))
    config = _digits_config(str(tmp_path / "data"))
    config.optim.flat_state = flat_state
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    assert full["num_examples"] == 360  # the whole digits test split, each example once
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "full"))

    original = input_pipeline.train_iterator

    def sigterm_during_third_batch(*args, **kwargs):
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(input_pipeline, "train_iterator", sigterm_during_third_batch)
    stopped = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert stopped == {}
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]

    monkeypatch.setattr(input_pipeline, "train_iterator", original)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    a, b = _saved_params(tmp_path / "full", 6), _saved_params(tmp_path / "resumed", 6)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert a["ema"] is not None and a["batch_stats"]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert resumed["accuracy"] == pytest.approx(full["accuracy"])
    # A third run finds the final checkpoint and only evaluates.
    again = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert again["accuracy"] == pytest.approx(full["accuracy"])


def test_init_checkpoint_from_another_resolution_resizes_tables(tmp_path):
    """Fine-tuning: EMA weights saved at 64x64 on 8 devices start a 96x64 run on 1 device
    with resized relative tables and a fresh optimizer, and the first (donating) step runs."""
    from hybrid_attn import checkpoint
    from hybrid_attn.models import get_model

    model = get_model("coatnet_0", num_classes=3, depths=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                      stem_width=8, head_dim=8)
    tx = optax.adamw(1e-3)
    rng = jax.random.PRNGKey(0)
    old, _ = train.create_train_state(model, tx, rng, (1, 64, 64, 3), sharding.make_mesh(),
                                      ema=True)
    old = old.replace(ema=jax.tree_util.tree_map(lambda x: x + 1, old.ema))  # EMA != raw
    saver = checkpoint.Checkpointer(str(tmp_path / "pretrain"))
    saver.save(7, old)
    saver.close()

    mesh = sharding.make_mesh(jax.devices()[:1])
    new, shardings = train.create_train_state(model, tx, jax.random.PRNGKey(1), (1, 96, 64, 3),
                                              mesh, ema=True)
    fresh = checkpoint.Checkpointer(str(tmp_path / "finetune"))
    state, source = train.initial_state(
        new, fresh, init_checkpoint=str(tmp_path / "pretrain" / "checkpoints" / "7"),
        model=model, image_shape=(1, 96, 64, 3))
    assert source.startswith("init_checkpoint") and "EMA weights" in source
    table = ("stage3", "block0", "attn", "position", "relative_bias_table")

    def leaf(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    assert leaf(old.params, table).shape[:2] == (7, 7)   # 4x4 map at 64x64
    assert leaf(state.params, table).shape[:2] == (11, 7)  # 6x4 map at 96x64
    np.testing.assert_array_equal(state.params["head"]["kernel"],
                                  old.ema["params"]["head"]["kernel"])
    assert int(state.step) == 0
    step = train.make_train_step(model, tx, optax.constant_schedule(1e-3), rng, 0.9,
                                 shardings, mesh)
    batch = {"image": jnp.zeros((2, 96, 64, 3)), "label": jnp.full((2, 3), 1 / 3)}
    state, metrics = step(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics.compute()["loss"]))
    fresh.close()


def test_bf16_switch_keeps_float32_parameters_and_logits():
    c = load_config("coatnet0", "digits,bf16")
    c.model.update(depths=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8, head_dim=8)
    model = train.build_model(c)
    assert model.dtype == jnp.bfloat16
    x = jnp.ones((2, 32, 32, 3))
    # Jitted: on CPU one compile of init is ~6x cheaper than its ops one by one.
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}

    def logits_of(m):
        return jax.jit(lambda v, x: m.apply(v, x, train=False))(variables, x)

    logits = logits_of(model)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    # The compute really ran in bfloat16: the same weights in float32 give other logits.
    full = logits_of(model.clone(dtype=jnp.float32))
    assert 0 < float(jnp.max(jnp.abs(full - logits))) < 0.5
