"""Benchmark one model's train or inference step; prints one JSON line.

    python -m hybrid_attn.bench --model coatnet_0 --res 224 --batch 16 --mode train
    python -m hybrid_attn.bench --layer local_attention --map 56x56x64 --batch 8 --mode train

``--layer`` measures a single spatial layer on a feature map instead (SASA's local
attention or, for comparison, a 3x3 convolution); ``--mode train`` is forward + backward.

Reports images/s and ms per step (median over ``--steps`` timed steps after warm-up),
compile time, the FLOPs per step from XLA's cost analysis summed over devices (XLA counts a
multiply-add as two FLOPs), the compiled per-device program's temporary memory and, where
the backend reports it, the device's peak memory in use.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from hybrid_attn import sharding, train
from hybrid_attn.models import get_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "coatnet_0", "Registered model name (see models.list_models()).")
flags.DEFINE_integer("res", 224, "Square input resolution.")
flags.DEFINE_integer("batch", 16, "Global batch size.")
flags.DEFINE_enum("mode", "train", ["train", "infer"], "Benchmark a train step or inference.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("num_classes", 1000, "Classifier width.")
flags.DEFINE_enum("layer", None, ["local_attention", "conv3x3"],
                  "Benchmark one layer on a --map feature map instead of a model.")
flags.DEFINE_string("map", "56x56x64", "HxWxC feature map for --layer.")


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _time(compiled, args, steps: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_layer_benchmark(layer: str, feature_map: str, batch: int, mode: str,
                        dtype: str = "float32", steps: int = 10, warmup: int = 2) -> dict:
    """Time and XLA temporary memory of one spatial layer on a ``HxWxC`` map."""
    from flax import linen as nn

    from hybrid_attn.models.layers.local_attention import LocalSelfAttention

    try:
        h, w, c = (int(v) for v in feature_map.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--map must look like 56x56x64, got {feature_map!r}") from e
    compute = train.COMPUTE_DTYPES[dtype]
    if layer == "local_attention":
        module = LocalSelfAttention(features=c, dtype=compute)
    else:
        module = nn.Conv(c, (3, 3), padding="SAME", use_bias=False, dtype=compute)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, h, w, c), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x)

    def forward(p, x):
        return module.apply(p, x)

    def forward_backward(p, x):
        return jax.grad(lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32) ** 2),
                        argnums=(0, 1))(p, x)

    fn = forward if mode == "infer" else forward_backward
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    step_s = _time(compiled, (params, x), steps, warmup)
    return {
        "layer": layer, "mode": mode, "map": [h, w, c], "batch": batch, "dtype": dtype,
        "device": jax.devices()[0].device_kind,
        "step_ms": round(step_s * 1e3, 2),
        "compile_s": round(compile_s, 2),
        "flops_per_step": _flops(compiled),
        "map_bytes": x.size * x.dtype.itemsize,
        "temp_memory_bytes": getattr(compiled.memory_analysis(), "temp_size_in_bytes", None),
    }


def run_benchmark(model_name: str, res: int, batch: int, mode: str, dtype: str = "float32",
                  steps: int = 10, warmup: int = 2, num_classes: int = 1000) -> dict:
    """Compiles and times the step; returns the measurements as a dict."""
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch, mesh, "--batch")
    model = get_model(model_name, num_classes=num_classes, dtype=train.COMPUTE_DTYPES[dtype])
    tx = optax.adamw(1e-3, weight_decay=0.05)
    rng = jax.random.PRNGKey(0)
    state, shardings = train.create_train_state(model, tx, rng, (1, res, res, 3), mesh, ema=False)
    images = jax.random.normal(rng, (batch, res, res, 3), jnp.float32)
    labels = jax.nn.one_hot(jnp.arange(batch) % num_classes, num_classes)
    batch_data = jax.device_put({"image": images, "label": labels}, sharding.batch_sharding(mesh))
    if mode == "train":
        step = train.make_train_step(model, tx, optax.constant_schedule(1e-3), rng, 0.0,
                                     shardings, mesh)
        args = (state, batch_data)
    else:
        variables = {"params": state.params}
        if jax.tree_util.tree_leaves(state.batch_stats):
            variables["batch_stats"] = state.batch_stats
        step = jax.jit(lambda v, b: model.apply(v, b["image"], train=False))
        args = (variables, batch_data)

    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0

    if mode == "train":  # the step donates its state: thread it through the calls
        holder = {"state": args[0]}

        def step_fn(_, batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        step_s = _time(step_fn, args, steps, warmup)
    else:
        step_s = _time(compiled, args, steps, warmup)
    memory = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "model": model_name, "mode": mode, "res": res, "batch": batch, "dtype": dtype,
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
        "img_per_s": round(batch / step_s, 2),
        "step_ms": round(step_s * 1e3, 2),
        "compile_s": round(compile_s, 2),
        # XLA analyses the per-device program; data parallelism splits the work evenly.
        "flops_per_step": _flops(compiled) * mesh.devices.size,
        "temp_memory_bytes": getattr(memory, "temp_size_in_bytes", None),
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
    }


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.layer:
        result = run_layer_benchmark(FLAGS.layer, FLAGS.map, FLAGS.batch, FLAGS.mode,
                                     FLAGS.dtype, FLAGS.steps, FLAGS.warmup)
    else:
        result = run_benchmark(FLAGS.model, FLAGS.res, FLAGS.batch, FLAGS.mode, FLAGS.dtype,
                               FLAGS.steps, FLAGS.warmup, FLAGS.num_classes)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
