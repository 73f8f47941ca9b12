"""Checkpointer safety: unreadable newest steps are skipped, other models are refused in
one sentence, non-finite states are never written, and loads ignore the saving topology."""

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn import checkpoint, sharding

META = {"model_name": "coatnet_0", "summary": "0.01M parameters, 10 classes, 32px"}


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict


def _state(step: int, scale: float = 1.0) -> State:
    kernel = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) * scale
    return State(step=jnp.int32(step), params={"dense": {"kernel": kernel}})


def _saved(workdir, steps, meta=META):
    ckpt = checkpoint.Checkpointer(str(workdir), keep=5, meta=meta)
    for s in steps:
        ckpt.save(s, _state(s, scale=s))
    ckpt.close()


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    """Finding 3: a newest step with a missing or truncated file used to crash every rerun
    inside orbax; now it is moved aside (named in the warning) and the previous one used."""
    _saved(tmp_path, [2, 4])
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "4" / "state")
             for f in fs if "/d/" in os.path.join(d, f)]
    assert files, "expected orbax data files under state/"
    for f in files:
        if damage == "delete":
            os.remove(f)
        else:
            with open(f, "r+b") as fh:
                fh.truncate(3)
    ckpt = checkpoint.Checkpointer(str(tmp_path), meta=META)
    with caplog.at_level("WARNING"):
        restored, step = ckpt.restore(_state(0))
    assert step == 2 and int(restored.step) == 2
    np.testing.assert_array_equal(restored.params["dense"]["kernel"],
                                  _state(2, scale=2).params["dense"]["kernel"])
    assert any(f"{tmp_path}/checkpoints/4" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path / "checkpoints.skipped"))[0].startswith("4.")
    # The step can be saved again and is the newest afterwards.
    ckpt.save(4, _state(4, scale=4))
    ckpt.close()
    assert checkpoint.Checkpointer(str(tmp_path), meta=META).restore(_state(0))[1] == 4


def test_workdir_of_another_model_is_refused_in_one_sentence(tmp_path):
    """Finding 7: resuming in another model's workdir gave a long orbax tree diff."""
    _saved(tmp_path, [3])
    other = {"model_name": "botnet50", "summary": "20.86M parameters, 1000 classes, 224px"}
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.Checkpointer(str(tmp_path), meta=other).restore(_state(0))
    message = str(e.value)
    assert "\n" not in message and "coatnet_0" in message and "botnet50" in message
    assert os.path.isdir(tmp_path / "checkpoints" / "3")  # refused, not skipped
    # Same name, other shapes (e.g. another size): refused too, never "skipped as corrupt".
    bigger = State(step=jnp.int32(0), params={"dense": {"kernel": jnp.zeros((64, 16))}})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="coatnet_0"):
        checkpoint.Checkpointer(str(tmp_path), meta=META).restore(bigger)


@flax.struct.dataclass
class OptState:
    step: jax.Array
    params: dict
    opt_state: object


def test_same_model_with_another_optimizer_layout_names_the_optimizer(tmp_path):
    """A workdir written with per-leaf AdamW moments, resumed with optim.flat_state (one
    flat vector): the error says the optimizer state differs, not that the model does."""
    import optax

    from hybrid_attn import optim

    params = _state(0).params
    per_leaf, flat = (optim.make_optimizer(optim.OptimConfig(flat_state=f),
                                           optax.constant_schedule(1e-3))
                      for f in (False, True))
    ckpt = checkpoint.Checkpointer(str(tmp_path), meta=META)
    ckpt.save(2, OptState(jnp.int32(2), params, per_leaf.init(params)))
    ckpt.close()
    with pytest.raises(checkpoint.CheckpointMismatchError, match="optimizer state") as e:
        checkpoint.Checkpointer(str(tmp_path), meta=META).restore(
            OptState(jnp.int32(0), params, flat.init(params)))
    assert "\n" not in str(e.value) and "flat_state" in str(e.value)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")  # refused, not skipped


def test_non_finite_state_is_never_written(tmp_path):
    """Finding 1 (storage side): keep-last-N cannot replace good steps by NaN ones."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, meta=META)
    ckpt.save(1, _state(1))
    bad = _state(2).replace(params={"dense": {"kernel": jnp.full((64, 8), jnp.nan)}})
    with pytest.raises(checkpoint.NonFiniteStateError, match="step 2"):
        ckpt.save(2, bad)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_checkpoint_of_8_device_fsdp_mesh_loads_on_1_device(tmp_path):
    """Finding 2: load_variables used the saved shardings and failed on another topology
    ("Topology mismatch"); the state here is split over 8 devices and read by a fresh
    process that has one."""
    mesh = sharding.make_mesh(fsdp=8)
    state = _state(5)
    shardings = sharding.tree_shardings(
        state, mesh, sharding.ShardingConfig(fsdp=8, min_fsdp_elements=0))
    state = jax.device_put(state, shardings)
    assert len(state.params["dense"]["kernel"].addressable_shards) == 8
    ckpt = checkpoint.Checkpointer(str(tmp_path), meta=META)
    ckpt.save(5, state)
    ckpt.close()
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from hybrid_attn import checkpoint
        assert jax.device_count() == 1
        v = checkpoint.load_variables({str(tmp_path / "checkpoints" / "5")!r})
        k = np.asarray(v["params"]["dense"]["kernel"])
        assert np.array_equal(k, np.arange(512, dtype=np.float32).reshape(64, 8)), k
        print("loaded", v["meta"]["model_name"])
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded coatnet_0" in out.stdout
