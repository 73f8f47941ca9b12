"""Sharding rules, FSDP numerics against one device, and CoAtNet-4's per-device memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from hybrid_attn import optim, sharding, train
from hybrid_attn.models import get_model


def _specs(tree, mesh, cfg):
    return jax.tree_util.tree_map(lambda s: s.spec, sharding.tree_shardings(tree, mesh, cfg))


def test_fsdp_rule_splits_largest_divisible_dim_and_replicates_the_rest():
    mesh = sharding.make_mesh(fsdp=8)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    tree = {"params": {"qkv": {"kernel": jax.ShapeDtypeStruct((64, 192), jnp.float32),
                               "bias": jax.ShapeDtypeStruct((192,), jnp.float32)},
                       "odd": {"kernel": jax.ShapeDtypeStruct((7, 999), jnp.float32)},
                       "table": {"relative_bias_table": jax.ShapeDtypeStruct((400, 16),
                                                                              jnp.float32)}},
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
    cfg = sharding.ShardingConfig(fsdp=8, min_fsdp_elements=1000,
                                  rules=((r"relative_bias_table$", "replicate"), (".*", "fsdp")))
    specs = _specs(tree, mesh, cfg)
    assert specs["params"]["qkv"]["kernel"] == P(None, "fsdp")  # 192 > 64, both divisible
    assert specs["params"]["qkv"]["bias"] == P()  # 192 elements < min_fsdp_elements
    assert specs["params"]["odd"]["kernel"] == P()  # nothing divisible by 8
    assert specs["params"]["table"]["relative_bias_table"] == P()  # first rule wins
    assert specs["step"] == P()
    # fsdp=1 (the default) replicates everything, whatever the rules say.
    assert set(jax.tree_util.tree_leaves(
        _specs(tree, sharding.make_mesh(), sharding.ShardingConfig()))) == {P()}


def test_sharding_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kind must be one of"):
        sharding.ShardingConfig(rules=((".*", "shard"),))
    with pytest.raises(ValueError, match="Unknown sharding config keys"):
        sharding.ShardingConfig.from_config({"fsdpp": 8})
    with pytest.raises(ValueError, match="must divide the device count 8"):
        sharding.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="num_devices must be 0"):
        sharding.ShardingConfig(num_devices=-1)
    with pytest.raises(ValueError, match="num_devices=9 exceeds the 8 devices"):
        sharding.config_mesh(sharding.ShardingConfig(num_devices=9))


def test_num_devices_takes_the_first_devices_and_0_takes_all():
    every = sharding.config_mesh(sharding.ShardingConfig())
    assert list(every.devices.flat) == jax.devices() and every.shape == {"data": 8, "fsdp": 1}
    part = sharding.config_mesh(sharding.ShardingConfig(num_devices=4, fsdp=2))
    assert list(part.devices.flat) == jax.devices()[:4] and part.shape == {"data": 2, "fsdp": 2}
    one = sharding.config_mesh(sharding.ShardingConfig(num_devices=1))
    batch = sharding.to_global({"x": np.arange(6.0).reshape(3, 2)}, one)["x"]
    assert batch.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(batch, np.arange(6.0).reshape(3, 2))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)  # BatchNorm follows
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.gelu(x).mean(axis=(1, 2))
        x = nn.Dense(32)(x)
        return nn.Dense(10)(nn.gelu(x))


def _fsdp_step(mesh, cfg, batch):
    model = Mlp()
    # SGD: AdamW's first step is sign(g), which would turn float noise into disagreement.
    ocfg = optim.OptimConfig(name="sgd", learning_rate=0.1, warmup_steps=0,
                             schedule="constant", weight_decay=1e-4)
    schedule = optim.make_schedule(ocfg, 10)
    tx = optim.make_optimizer(ocfg, schedule)
    rng = jax.random.PRNGKey(0)
    state, shardings = train.create_train_state(model, tx, rng, (1, 8, 8, 3), mesh, ema=True,
                                                sharding_cfg=cfg)
    step = train.make_train_step(model, tx, schedule, rng, 0.9, shardings, mesh)
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    return state, {k: float(v) for k, v in metrics.compute().items()}


def test_fsdp_on_8_devices_matches_1_device():
    """Same loss (rel 1e-5) and same updated params, optimizer state, EMA and BatchNorm
    statistics (rtol 1e-5, atol 1e-6) with the state sharded 8 ways as on one device."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
    cfg8 = sharding.ShardingConfig(fsdp=8, min_fsdp_elements=0)
    state8, m8 = _fsdp_step(sharding.make_mesh(fsdp=8), cfg8, batch)
    state1, m1 = _fsdp_step(sharding.make_mesh(jax.devices()[:1]), sharding.ShardingConfig(),
                            batch)
    kernel = state8.params["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp") and len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (16, 4)
    trace = jax.tree_util.tree_leaves(state8.opt_state)  # SGD momentum, shaped like params
    assert P(None, "fsdp") in {x.sharding.spec for x in trace}
    assert state8.ema["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert m8["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    leaves8 = jax.tree_util.tree_leaves(jax.device_get(state8))
    leaves1 = jax.tree_util.tree_leaves(jax.device_get(state1))
    for a, b in zip(leaves8, leaves1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The step really moved the parameters.
    fresh, _ = train.create_train_state(Mlp(), optax.identity(), jax.random.PRNGKey(0),
                                        (1, 8, 8, 3), sharding.make_mesh(jax.devices()[:1]),
                                        ema=False)
    assert not np.allclose(fresh.params["Dense_0"]["kernel"], state1.params["Dense_0"]["kernel"])


def coatnet4_train_state() -> train.TrainState:
    """CoAtNet-4's AdamW + EMA train state at 224px as ShapeDtypeStructs (traced with
    ``jax.eval_shape``, never run)."""
    model = get_model("coatnet_4", num_classes=1000)
    ocfg = optim.OptimConfig(warmup_steps=0)
    tx = optim.make_optimizer(ocfg, optim.make_schedule(ocfg, 10))

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
        params, stats = variables["params"], variables.get("batch_stats", {})
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                batch_stats=stats, opt_state=tx.init(params),
                                ema={"params": params, "batch_stats": stats})

    return jax.eval_shape(init, jax.random.PRNGKey(0))


def compiled_bytes_per_device(abstract: train.TrainState, fsdp: int) -> int:
    """XLA's memory analysis of a program taking the state placed by the default rules:
    the bytes of it each device holds."""
    mesh = sharding.make_mesh(fsdp=fsdp)
    shardings = sharding.tree_shardings(abstract, mesh, sharding.ShardingConfig(fsdp=fsdp))
    compiled = jax.jit(lambda s: s, in_shardings=(shardings,), out_shardings=shardings,
                       donate_argnums=0).lower(abstract).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def test_coatnet4_train_state_per_device_memory_with_fsdp8_is_an_eighth():
    abstract = coatnet4_train_state()
    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    replicated = compiled_bytes_per_device(abstract, fsdp=1)
    fsdp8 = compiled_bytes_per_device(abstract, fsdp=8)
    print(f"CoAtNet-4 train state per device: replicated {replicated / 2**30:.3f} GiB, "
          f"fsdp=8 {fsdp8 / 2**30:.3f} GiB (ratio {fsdp8 / replicated:.4f})")
    assert replicated == pytest.approx(total, rel=1e-3)
    # Small leaves (norms, biases) stay replicated: a little over an eighth.
    assert 1 / 8 <= fsdp8 / replicated < 1 / 8 * 1.02
