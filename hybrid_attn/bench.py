"""Benchmark one model's train or inference step; prints one JSON line.

    python -m hybrid_attn.bench --model coatnet_0 --res 224 --batch 16 --mode train
    python -m hybrid_attn.bench --model coatnet_0 --res 224 --batch 8 --mode train \\
        --threads 1 --against timm --timm_python /path/to/timm-venv/bin/python
    python -m hybrid_attn.bench --layer local_attention --map 56x56x64 --batch 8 --mode train

``--layer`` measures a single spatial layer on a feature map instead (SASA's local
attention or, for comparison, a 3x3 convolution); ``--mode train`` is forward + backward.

Reports images/s and ms per step (median over ``--steps`` timed steps after warm-up), the
process CPU time per step (on a shared machine the steadier measure of work at one
thread), compile time (``compile_s``: tracing, lowering and XLA's compile; ``lower_s``: tracing
and lowering alone; ``compilation_cache`` names JAX's persistent cache directory when
``JAX_COMPILATION_CACHE_DIR`` sets one, and then a repeated run loads the executable),
the FLOPs per step from XLA's cost analysis summed over devices (XLA counts a multiply-add
as two FLOPs), the compiled per-device program's temporary memory
and, where the backend reports it, the device's peak memory in use. A train step is
forward + backward + the trainer's AdamW update (:func:`hybrid_attn.optim.make_optimizer`, lr
1e-3, weight decay 0.05 on the matrices, no clipping); ``--flat_optimizer`` runs it on one
flat vector (``optim.flat_state``).

``--against timm`` also runs timm's model of the same architecture (:data:`TIMM_NAMES`)
with the same protocol, eagerly and with ``torch.compile``, and adds the ratios (ours /
timm in images/s, and timm / ours in CPU time per step). The project never imports torch:
the timm side runs in a subprocess, ``hybrid_attn/bench_timm.py`` executed by
``--timm_python`` (default ``$HYBRID_ATTN_TIMM_PYTHON``, else this python), so torch lives
in its own environment and a torch thread pool never shares this process with XLA's. The
JSON line then carries both sides, and a Markdown table row goes to stderr.

``--rounds R`` makes the two sides take turns: after both have compiled, an untimed round
of ``--warmup`` steps each, then ``--steps`` steps of ours, then of timm eager (and
compiled), then the same in reverse order, R rounds in all (the timm process serves the
requests, ``bench_timm.py --serve``; only one side runs at a time). Each round gives a
ratio of median step times, and the reported ratio is the median over rounds
(``round_ratios_vs_*`` lists them): on a shared VM whose speed drifts by several per cent
within minutes, both sides then see the same machine, which one run of each after the
other does not give. The default, one round, is ours' steps then timm's.

``--threads N`` pins this process (and so the timm subprocess, which also calls
``torch.set_num_threads(N)``) to N CPUs before XLA starts. CPU affinity is what limits
XLA:CPU: it sizes its thread pools from the allowed CPUs, whereas
``--xla_cpu_multi_thread_eigen=false`` left a 2048x2048 matmul using 1.6 cores (jax 0.10).

Run as ``python -m hybrid_attn.bench`` it restarts itself with glibc tunables that keep
large blocks mapped and runs XLA:CPU computations on the calling thread
(:mod:`hybrid_attn.host_malloc`, as the training entry point does on a CPU-only install),
and the timm subprocess inherits the tunables, so both sides run with the same malloc;
without them each step page-faults its freshly mapped buffers on both sides.
``HYBRID_ATTN_MALLOC=default`` keeps glibc's defaults on both sides. The JSON line records
which applied (``malloc``).
"""

from __future__ import annotations

from hybrid_attn import host_malloc

if __name__ == "__main__":  # before jax loads: glibc tunables are read at process start
    host_malloc.configure_process()

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from hybrid_attn import bench_timm, optim, sharding, train, xla_cpu
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
flags.DEFINE_integer("threads", None, "Pin this process (and the timm side) to N CPUs.")
flags.DEFINE_enum("against", None, ["timm"], "Also run timm's model of the same architecture.")
flags.DEFINE_string("timm_python", None,
                    "Python with torch + timm for --against timm "
                    "(default $HYBRID_ATTN_TIMM_PYTHON, else this python).")
flags.DEFINE_string("timm_model", None, "timm model name (default: TIMM_NAMES[--model]).")
flags.DEFINE_bool("timm_compile", True, "Also time timm under torch.compile.")
flags.DEFINE_integer("rounds", 1, "With --against timm: time --steps steps of each side in "
                     "turn, this many rounds (ABBA order); ratios are medians over rounds.")
flags.DEFINE_enum("remat", None, ["none", "block"],
                  "Rematerialisation policy, where the model has a `remat` field.")
flags.DEFINE_bool("scan", None, "Scan over a stage's repeated blocks, where the model has a "
                  "`scan_blocks` field.")
flags.DEFINE_bool("flat_optimizer", False, "Train with AdamW's moments on one flat vector "
                  "of all parameters (config optim.flat_state) instead of per parameter.")
flags.DEFINE_bool("light_codegen", True, "On CPU, compile the state's init and the train "
                  "step with xla_cpu.CPU_LIGHT_CODEGEN (LLVM -O1), as the trainer does; "
                  "--nolight_codegen uses LLVM's default level for both.")

# Our name -> timm's model of the same architecture. BoTNet-50 has no exact timm twin:
# botnet50ts_256 (tiered 3-conv stem, SiLU) is the nearest and is flagged as such. timm's
# resnet26 is [2, 2, 2, 2] blocks (16.0M), not SASA's ResNet-26 ([1, 2, 4, 1], 13.7M).
TIMM_NAMES: dict[str, str] = {
    **{f"coatnet_{i}": f"coatnet_{i}_224" for i in range(5)},
    **{f"coatnet_{i}_rw": f"coatnet_{i}_rw_224" for i in range(4)},
    **{f"resnet{d}": f"resnet{d}" for d in (50, 101, 152)},
    **{f"twins_{k}_{s}": f"twins_{k}_{size}" for k in ("pcpvt", "svt")
       for s, size in (("s", "small"), ("b", "base"), ("l", "large"))},
    "botnet50": "botnet50ts_256",
}
NEAREST_ONLY = frozenset({"botnet50"})


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _timed(step: Callable[[], Any], steps: int) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of each of ``steps`` calls of ``step`` (blocked on):
    the timm side's timing loop, so both sides are timed alike."""
    t = bench_timm.timed(lambda: jax.block_until_ready(step()), steps)
    return t["walls"], t["cpus"]


def _time(step: Callable[[], Any], steps: int, warmup: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per call after ``warmup`` untimed calls."""
    _timed(step, warmup)
    walls, cpus = _timed(step, steps)
    return statistics.median(walls), statistics.median(cpus)


def limit_threads(threads: int | None) -> None:
    """Pins this process to its first ``threads`` allowed CPUs; call before XLA starts
    (threads started earlier keep their affinity)."""
    if threads is None:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(allowed):
        raise ValueError(f"--threads must be in 1..{len(allowed)} (allowed CPUs), got {threads}")
    os.sched_setaffinity(0, allowed[:threads])


def model_overrides(model_name: str, remat: str | None, scan: bool | None) -> tuple[dict, dict]:
    """(constructor overrides, notes) for the ``remat``/``scan`` switches: a switch the
    model has no field for is skipped and noted as unsupported."""
    fields = {f.name for f in dataclasses.fields(get_model(model_name))}
    overrides, notes = {}, {}
    for flag, name, value in (("remat", "remat", remat), ("scan", "scan_blocks", scan)):
        if value is None:
            continue
        if name in fields:
            overrides[name] = value
        notes[flag] = value if name in fields else f"unsupported by {model_name}"
    return overrides, notes


def run_layer_benchmark(layer: str, feature_map: str, batch: int, mode: str,
                        dtype: str = "float32", steps: int = 10, warmup: int = 2) -> dict:
    """Time and XLA temporary memory of one spatial layer on a ``HxWxC`` map."""
    from flax import linen as nn

    from hybrid_attn.models.layers.local_attention import LocalSelfAttention

    try:
        h, w, c = (int(v) for v in feature_map.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--map must look like 56x56x64, got {feature_map!r}") from e
    compute = jnp.dtype(dtype)
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
    step_s, _ = _time(lambda: compiled(params, x), steps, warmup)
    return {
        "layer": layer, "mode": mode, "map": [h, w, c], "batch": batch, "dtype": dtype,
        "device": jax.devices()[0].device_kind,
        "step_ms": round(step_s * 1e3, 2),
        "compile_s": round(compile_s, 2),
        "flops_per_step": _flops(compiled),
        "map_bytes": x.size * x.dtype.itemsize,
        "temp_memory_bytes": getattr(compiled.memory_analysis(), "temp_size_in_bytes", None),
    }


def prepare_benchmark(model_name: str, res: int, batch: int, mode: str, dtype: str = "float32",
                      num_classes: int = 1000, remat: str | None = None,
                      scan: bool | None = None, flat_optimizer: bool = False,
                      light_codegen: bool = True) -> tuple[dict, Callable[[], Any]]:
    """Builds and compiles the step: (what :func:`run_benchmark` reports apart from the
    timings, a function that runs one step and blocks until it is done).
    ``light_codegen``: ``train.create_train_state``'s and ``train.make_train_step``'s."""
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch, mesh, "--batch")
    overrides, notes = model_overrides(model_name, remat, scan)
    model = get_model(model_name, num_classes=num_classes, dtype=jnp.dtype(dtype),
                      **overrides)
    # The trainer's AdamW (masked decoupled decay) at a constant rate, without clipping,
    # as the timm side's torch.optim.AdamW (which decays every parameter; the biases and
    # norm scales ours leaves undecayed are a negligible share of the step's work).
    optim_cfg = optim.OptimConfig(learning_rate=1e-3, schedule="constant", weight_decay=0.05,
                                  grad_clip_norm=0.0, flat_state=flat_optimizer)
    schedule = optim.make_schedule(optim_cfg, total_steps=1)
    tx = optim.make_optimizer(optim_cfg, schedule)
    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    state, shardings = train.create_train_state(model, tx, rng, (1, res, res, 3), mesh,
                                                ema=False, light_codegen=light_codegen)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    images = jax.random.normal(rng, (batch, res, res, 3), jnp.float32)
    labels = jax.nn.one_hot(jnp.arange(batch) % num_classes, num_classes)
    batch_data = jax.device_put({"image": images, "label": labels}, sharding.batch_sharding(mesh))
    if mode == "train":
        options = train.light_compiler_options(mesh, light_codegen)
        step = train.make_train_step(model, tx, schedule, rng, 0.0, shardings, mesh,
                                     light_codegen=light_codegen)
        args = (state, batch_data)
    else:
        variables = {"params": state.params}
        if jax.tree_util.tree_leaves(state.batch_stats):
            variables["batch_stats"] = state.batch_stats
        options = xla_cpu.compiler_options(mesh.devices.flat[0].platform)
        step = jax.jit(lambda v, b: model.apply(v, b["image"], train=False),
                       compiler_options=options)
        args = (variables, batch_data)

    t0 = time.perf_counter()
    lowered = step.lower(*args)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    if mode == "train":  # the step donates its state: thread it through the calls
        holder = {"state": args[0]}

        def call():
            holder["state"], metrics = compiled(holder["state"], batch_data)
            return metrics
    else:
        def call():
            return compiled(*args)

    memory = compiled.memory_analysis()
    return {
        "model": model_name, "mode": mode, "res": res, "batch": batch, "dtype": dtype,
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
        "cpus": len(os.sched_getaffinity(0)),
        "compile_s": round(compile_s, 2),  # tracing + lowering + XLA compile
        "lower_s": round(lower_s, 2),  # tracing + lowering to StableHLO alone
        "init_s": round(init_s, 2),  # create_train_state: tracing, compile and run
        # The XLA options the step compiled with (None: XLA's defaults).
        "compiler_options": options,
        # JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR), if on: a warm cache
        # makes compile_s the load of a stored executable, not a compile.
        "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        # XLA analyses the per-device program; data parallelism splits the work evenly.
        "flops_per_step": _flops(compiled) * mesh.devices.size,
        "temp_memory_bytes": getattr(memory, "temp_size_in_bytes", None),
        **({"flat_optimizer": True} if mode == "train" and flat_optimizer else {}),
        **notes,
    }, lambda: jax.block_until_ready(call())


def run_benchmark(model_name: str, res: int, batch: int, mode: str, dtype: str = "float32",
                  steps: int = 10, warmup: int = 2, num_classes: int = 1000,
                  remat: str | None = None, scan: bool | None = None,
                  flat_optimizer: bool = False, light_codegen: bool = True) -> dict:
    """Compiles and times the step; returns the measurements as a dict (``img_per_s``,
    ``step_ms`` and ``cpu_ms`` from the median of ``steps`` steps after ``warmup``)."""
    info, step = prepare_benchmark(model_name, res, batch, mode, dtype, num_classes, remat,
                                   scan, flat_optimizer, light_codegen)
    step_s, cpu_s = _time(step, steps, warmup)
    return {**info, **_speed(batch, step_s, cpu_s), "peak_memory_bytes": _peak_memory()}


def _speed(batch: int, step_s: float, cpu_s: float) -> dict:
    return {"img_per_s": round(batch / step_s, 2), "step_ms": round(step_s * 1e3, 2),
            "cpu_ms": round(cpu_s * 1e3, 2)}


def _peak_memory() -> int | None:
    """The device's peak memory in use so far, where the backend reports it (not on CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def timm_python(flag: str | None) -> str:
    """The python that runs the timm side: the flag, ``$HYBRID_ATTN_TIMM_PYTHON``, or this
    one; a one-line error if it cannot import torch and timm."""
    python = flag or os.environ.get("HYBRID_ATTN_TIMM_PYTHON") or sys.executable
    try:
        ok = subprocess.run([python, "-c", "import timm, torch"], capture_output=True,
                            timeout=300).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise SystemExit(f"--against timm: {python} cannot import timm and torch; pass "
                         "--timm_python (or set HYBRID_ATTN_TIMM_PYTHON) to a python that can")
    return python


class TimmServer:
    """``bench_timm.py --serve`` under ``python``: builds timm's runs (eager and, with
    ``compile_model``, ``torch.compile``) and warms them up once, then times steps on
    request, so that the two sides can take turns (:func:`run_rounds`)."""

    def __init__(self, python: str, timm_model: str, res: int, batch: int, mode: str,
                 threads: int | None, warmup: int, compile_model: bool, num_classes: int):
        cmd = [python, str(Path(__file__).with_name("bench_timm.py")), "--serve",
               "--model", timm_model, "--res", str(res), "--batch", str(batch), "--mode", mode,
               "--warmup", str(warmup), "--num_classes", str(num_classes)]
        if threads:
            cmd += ["--threads", str(threads)]
        if not compile_model:
            cmd.append("--no-compile")
        self.timm_model = timm_model
        self._stderr = tempfile.TemporaryFile(mode="w+")  # torch.compile can log a lot
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True)
        self.runs: list[dict] = self._reply()["ready"]

    def _reply(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._proc.wait()
        self._stderr.seek(0)
        tail = self._stderr.read().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"--against timm: {self.timm_model} failed: {tail[0]}")

    def time(self, compiled: bool, steps: int) -> tuple[list[float], list[float]]:
        """(wall, process CPU) seconds of each of ``steps`` steps of one run."""
        self._proc.stdin.write(json.dumps({"compiled": compiled, "steps": steps}) + "\n")
        self._proc.stdin.flush()
        reply = self._reply()
        return reply["walls"], reply["cpus"]

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.wait()
        self._stderr.close()


def run_key(run: dict) -> str:
    """``timm_compiled`` or ``timm_eager``: the JSON key of one timm run."""
    return "timm_compiled" if run["compiled"] else "timm_eager"


Rounds = tuple[list[list[float]], list[list[float]]]  # (walls, cpus), one list per round


def run_rounds(ours: Callable[[], Any], timm: TimmServer, rounds: int, steps: int,
               warmup: int = 0) -> tuple[Rounds, dict[str, tuple[dict, Rounds]]]:
    """Times ``steps`` steps of each side in turn, ``rounds`` times: ours, timm eager, timm
    compiled, then the reverse (ABBA), so that a machine whose speed drifts during the run
    slows both sides alike. An untimed round of ``warmup`` steps each comes first, once
    both sides are built (a side's first steps after the other has allocated its memory
    can be slow). Returns ours' times and, per timm run key, (its info, its times); only
    one side runs at a time (the other waits, idle)."""
    sides = ["ours"] + [run_key(r) for r in timm.runs]
    times: dict[str, Rounds] = {k: ([], []) for k in sides}
    for r in range(-1 if warmup else 0, rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            n = warmup if r < 0 else steps
            walls, cpus = (_timed(ours, n) if side == "ours"
                           else timm.time(side == "timm_compiled", n))
            if r >= 0:
                times[side][0].append(walls)
                times[side][1].append(cpus)
    return times.pop("ours"), {run_key(r): (r, times[run_key(r)]) for r in timm.runs}


def compare(ours: dict, ours_times: Rounds, timm_runs: dict[str, tuple[dict, Rounds]]) -> dict:
    """``ours`` (with ``batch``) given its speed and each timm run's, and the ratios (>1:
    ours faster). Speeds are medians over all timed steps. A ratio is the median over
    rounds of that round's ratio of median step times: ``ratio_vs_*`` in wall time
    (images/s, ours / timm), ``cpu_ratio_vs_*`` in process CPU time (timm / ours);
    ``round_ratios_vs_*`` lists each round's wall-time ratio."""
    def med(rounds: list[list[float]]) -> float:
        return statistics.median(v for r in rounds for v in r)

    def per_round(theirs: list[list[float]], mine: list[list[float]]) -> list[float]:
        return [statistics.median(t) / statistics.median(o)
                for t, o in zip(theirs, mine, strict=True)]

    batch = ours["batch"]
    out = {**ours, **_speed(batch, med(ours_times[0]), med(ours_times[1])),
           "rounds": len(ours_times[0])}
    for key, (info, (walls, cpus)) in timm_runs.items():
        out[key] = {**info, "img_per_s": round(batch / med(walls), 3),
                    "step_ms": round(med(walls) * 1e3, 1), "cpu_ms": round(med(cpus) * 1e3, 1)}
        ratios = per_round(walls, ours_times[0])
        out[f"ratio_vs_{key}"] = round(statistics.median(ratios), 3)
        out[f"cpu_ratio_vs_{key}"] = round(statistics.median(per_round(cpus, ours_times[1])), 3)
        out[f"round_ratios_vs_{key}"] = [round(v, 3) for v in ratios]
    return out


def table_row(r: dict) -> str:
    """One Markdown row: model, mode, img/s ours / timm eager / timm compiled, ratios."""
    def side(key: str) -> str:
        run = r.get(key)
        if run is None:
            return "- | -"
        return f"{run['img_per_s']:.2f} | {r[f'ratio_vs_{key}']:.2f}x"
    return (f"| {r['model']} | {r['mode']} | {r['cpus']} | {r['img_per_s']:.2f} | "
            f"{side('timm_eager')} | {side('timm_compiled')} | {r['compile_s']:.1f} s | "
            f"{r['temp_memory_bytes'] / 2**20:.0f} MiB |")


TABLE_HEADER = ("| model | mode | threads | ours img/s | timm eager img/s | ratio | "
                "timm compiled img/s | ratio | our compile | our temp memory |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str]) -> None:
    del argv
    limit_threads(FLAGS.threads)
    malloc = "kept_mapped" if host_malloc.active() else "default"
    if FLAGS.layer:
        result = run_layer_benchmark(FLAGS.layer, FLAGS.map, FLAGS.batch, FLAGS.mode,
                                     FLAGS.dtype, FLAGS.steps, FLAGS.warmup)
        print(json.dumps({**result, "malloc": malloc}))
        return
    if FLAGS.rounds < 1 or (FLAGS.rounds > 1 and FLAGS.against is None):
        raise SystemExit(f"--rounds must be 1, or more with --against timm; got {FLAGS.rounds}")
    if FLAGS.against is None:
        result = run_benchmark(FLAGS.model, FLAGS.res, FLAGS.batch, FLAGS.mode, FLAGS.dtype,
                               FLAGS.steps, FLAGS.warmup, FLAGS.num_classes, FLAGS.remat,
                               FLAGS.scan, FLAGS.flat_optimizer, FLAGS.light_codegen)
        print(json.dumps({**result, "malloc": malloc}))
        return
    timm_model = FLAGS.timm_model or TIMM_NAMES.get(FLAGS.model)
    if timm_model is None:
        raise SystemExit(f"--against timm: no timm counterpart for {FLAGS.model!r}; pass "
                         f"--timm_model (known: {', '.join(sorted(TIMM_NAMES))})")
    python = timm_python(FLAGS.timm_python)
    info, step = prepare_benchmark(FLAGS.model, FLAGS.res, FLAGS.batch, FLAGS.mode,
                                   FLAGS.dtype, FLAGS.num_classes, FLAGS.remat, FLAGS.scan,
                                   FLAGS.flat_optimizer, FLAGS.light_codegen)
    timm = TimmServer(python, timm_model, FLAGS.res, FLAGS.batch, FLAGS.mode, FLAGS.threads,
                      FLAGS.warmup, FLAGS.timm_compile, FLAGS.num_classes)
    try:
        ours_times, timm_runs = run_rounds(step, timm, FLAGS.rounds, FLAGS.steps,
                                           FLAGS.warmup)
    finally:
        timm.close()
    result = compare(info, ours_times, timm_runs)
    result.update(peak_memory_bytes=_peak_memory(), malloc=malloc, timm_same_architecture=(
        None if FLAGS.timm_model else FLAGS.model not in NEAREST_ONLY))
    print(TABLE_HEADER, table_row(result), sep="\n", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
