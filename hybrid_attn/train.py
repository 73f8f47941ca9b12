"""``train_and_evaluate``: state creation, the jitted step, the loop, and when to log,
evaluate and checkpoint.

The step is ``jax.jit`` over global arrays on a 1-D device mesh: the batch is sharded over
every device, parameters are replicated and created already placed (``jax.eval_shape``,
then a jitted init with ``out_shardings``), and the old state is donated. Per-step
randomness is ``fold_in(key, step)``, and the input pipeline is deterministic, so a run
resumed from a checkpoint repeats an uninterrupted one.
"""


import dataclasses
import functools
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hybrid_attn import checkpoint, evaluate, optim, sharding
from hybrid_attn.data import input_pipeline
from hybrid_attn.models import get_model, resize_position_tables

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; a pytree of arrays only (the checkpoint format)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Exponential moving average of {"params", "batch_stats"} used for evaluation; None
    # unless optim.ema_decay > 0. Averaging the BatchNorm statistics too keeps them
    # consistent with the averaged weights (as timm's ModelEmaV2 and TF's EMA do).
    ema: Any


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Average.from_output("accuracy")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


@dataclasses.dataclass(frozen=True)
class Actions:
    log: bool
    evaluate: bool
    checkpoint: bool


def actions_for_step(
    step: int,
    total_steps: int,
    *,
    log_every: int,
    eval_every: int,
    checkpoint_every: int,
    stop_requested: bool = False,
) -> Actions:
    """What to do after ``step`` updates have completed (``1 <= step <= total_steps``).

    Every period is counted in completed steps; a period <= 0 disables the periodic action.
    The last step always logs, evaluates and checkpoints; a stop request (SIGTERM) logs and
    checkpoints so the run can resume.
    """
    def every(n: int) -> bool:
        return n > 0 and step % n == 0

    last = step >= total_steps
    return Actions(
        log=every(log_every) or last or stop_requested,
        evaluate=every(eval_every) or last,
        checkpoint=every(checkpoint_every) or last or stop_requested,
    )


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The config's model with its class count and compute dtype (parameters stay float32)."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {config.compute_dtype!r}"
        )
    return get_model(
        config.model_name,
        num_classes=config.data.num_classes,
        dtype=COMPUTE_DTYPES[config.compute_dtype],
        **config.model.to_dict(),
    )


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    mesh: Mesh,
    *,
    ema: bool,
) -> tuple[TrainState, Any]:
    """Initialises the state directly in its (replicated) sharding; returns it and the
    sharding tree."""

    def init(rng):
        variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(image_shape), train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            ema=_copy({"params": params, "batch_stats": batch_stats}) if ema else None,
        )

    shardings = sharding.replicate_tree(jax.eval_shape(init, rng), mesh)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    base_rng: jax.Array,
    ema_decay: float,
) -> tuple[TrainState, TrainMetrics]:
    """One update on a global batch (``image`` NHWC, ``label`` soft targets [B, classes])."""
    rng = jax.random.fold_in(base_rng, state.step)
    has_bn = bool(jax.tree_util.tree_leaves(state.batch_stats))

    def loss_fn(params):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
        logits, updates = model.apply(
            variables, batch["image"], train=True,
            mutable=["batch_stats"] if has_bn else [], rngs={"dropout": rng},
        )
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), batch["label"]).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    batch_stats = updates["batch_stats"] if has_bn else state.batch_stats
    ema = state.ema
    if ema is not None:
        ema = optax.incremental_update(
            {"params": params, "batch_stats": batch_stats}, ema, 1.0 - ema_decay
        )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema=ema,
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss, accuracy=accuracy, grad_norm=optax.global_norm(grads),
        learning_rate=schedule(state.step),
    )
    return new_state, step_metrics


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    base_rng: jax.Array,
    ema_decay: float,
    state_shardings: Any,
    mesh: Mesh,
) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """``train_step`` jitted with explicit shardings and the old state donated."""
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, base_rng=base_rng, ema_decay=ema_decay
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


class _StopRequest:
    """Records SIGTERM so the loop can checkpoint and exit cleanly (e.g. on preemption).

    With several processes the decision must be the same everywhere (a host that stops to
    save while others step on would deadlock), so hosts agree on it every
    ``agree_every`` steps with an all-gather; a single process decides every step.
    """

    def __init__(self, agree_every: int = 10):
        self._signalled = False
        self._agree_every = agree_every
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing and exiting.")
        self._signalled = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        if step % self._agree_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self._signalled))
        return bool(np.any(flags))

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def initial_state(
    state: TrainState,
    ckpt: checkpoint.Checkpointer,
    *,
    init_checkpoint: str,
    model: nn.Module,
    image_shape: tuple[int, ...],
) -> tuple[TrainState, str]:
    """Resume order: the workdir's newest checkpoint, else ``init_checkpoint``, else scratch.

    ``init_checkpoint`` gives weights only (fresh optimizer and step): its EMA weights when
    it kept them (the ones its evaluations reported), else its raw weights. It may come
    from another resolution: position tables are resized for ``image_shape`` (e.g. 224 ->
    384 fine-tuning).
    """
    latest = ckpt.latest_step()
    if latest is not None:
        return ckpt.restore(state), f"workdir checkpoint at step {latest}"
    if not init_checkpoint:
        return state, "scratch"
    loaded = checkpoint.load_variables(init_checkpoint)
    source = loaded["ema"] or {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}
    weights = {
        "params": resize_position_tables(source["params"], model, image_shape),
        "batch_stats": source["batch_stats"],
    }
    target = {"params": state.params, "batch_stats": state.batch_stats}
    if jax.tree_util.tree_structure(weights) != jax.tree_util.tree_structure(target):
        raise ValueError(f"init_checkpoint {init_checkpoint} does not hold this model's variables")
    weights = jax.tree_util.tree_map(
        lambda new, old: jax.device_put(jnp.asarray(old, new.dtype), new.sharding),
        target, weights,
    )
    state = state.replace(
        params=weights["params"], batch_stats=weights["batch_stats"],
        ema=_copy(weights) if state.ema is not None else None,
    )
    kind = "EMA weights" if loaded["ema"] else "weights"
    return state, f"init_checkpoint {init_checkpoint} ({kind}, fresh optimizer)"


def _copy(tree: Any) -> Any:
    """Distinct buffers, so that donating the state never donates one buffer twice."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the
    final evaluation metrics on the config's eval split."""
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    input_cfg = input_pipeline.InputConfig.from_config(config.data)
    input_pipeline.get_builder(input_cfg)  # fails fast, with instructions, if not prepared
    num_train = input_pipeline.num_examples(input_cfg, input_cfg.train_split)
    steps_per_epoch = max(num_train // config.batch_size, 1)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(math.ceil(config.num_epochs * steps_per_epoch)))

    model = build_model(config)
    optim_cfg = optim.OptimConfig.from_config(config.optim, steps_per_epoch)
    schedule = optim.make_schedule(optim_cfg, total_steps)
    tx = optim.make_optimizer(optim_cfg, schedule)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    image_shape = (1, input_cfg.image_size, input_cfg.image_size, 3)
    state, state_shardings = create_train_state(
        model, tx, init_rng, image_shape, mesh, ema=optim_cfg.ema_decay > 0
    )
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    state, source = initial_state(state, ckpt, init_checkpoint=config.init_checkpoint,
                                  model=model, image_shape=image_shape)
    start_step = int(state.step)
    logging.info("Model %s: %.2fM parameters; %d steps (%d per epoch), batch %d; starting "
                 "from %s.", config.model_name, num_params / 1e6, total_steps,
                 steps_per_epoch, config.batch_size, source)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    if start_step == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items()
                              if isinstance(v, int | float | str | bool)})
    train_step_fn = make_train_step(
        model, tx, schedule, train_rng, optim_cfg.ema_decay, state_shardings, mesh
    )
    eval_step_fn = evaluate.make_eval_step(model)
    train_iter = input_pipeline.train_iterator(
        input_cfg, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step
    )
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
        every_secs=None,
    )

    def run_eval(step: int) -> dict[str, float]:
        variables = evaluate.eval_variables(state.params, state.batch_stats, state.ema)
        batches = input_pipeline.eval_iterator(
            input_cfg, input_cfg.eval_split, global_batch_size=config.eval_batch_size
        )
        result = evaluate.evaluate(eval_step_fn, variables, batches, mesh)
        writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items()})
        logging.info("step %d/%d eval on %r: accuracy %.4f, loss %.4f (%d examples)", step,
                     total_steps, input_cfg.eval_split, result["accuracy"], result["loss"],
                     result["num_examples"])
        return result

    stop = _StopRequest()
    stopped = False
    result: dict[str, float] = {}
    train_metrics = None
    hooks = []
    if config.profile and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
    last_log_time, last_log_step = time.time(), start_step
    try:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.to_global(next(train_iter), mesh)
                state, step_metrics = train_step_fn(state, batch)
            train_metrics = (step_metrics if train_metrics is None
                             else train_metrics.merge(step_metrics))
            progress(step)
            for hook in hooks:
                hook(step)
            stopped = stop.should_stop(step)  # read once: the save and the exit agree
            actions = actions_for_step(
                step, total_steps, log_every=config.log_every_steps,
                eval_every=config.eval_every_steps,
                checkpoint_every=config.checkpoint_every_steps,
                stop_requested=stopped,
            )
            if actions.log:
                summary = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
                elapsed = time.time() - last_log_time
                steps_per_s = (step - last_log_step) / max(elapsed, 1e-9)
                summary["train_images_per_sec"] = steps_per_s * config.batch_size
                writer.write_scalars(step, summary)
                eta = (total_steps - step) / max(steps_per_s, 1e-9)
                logging.info(
                    "step %d/%d: loss %.4f, accuracy %.3f, lr %.2e, grad_norm %.3f, "
                    "%.2f steps/s, %.0f images/s, ETA %s", step, total_steps,
                    summary["train_loss"], summary["train_accuracy"],
                    summary["train_learning_rate"], summary["train_grad_norm"], steps_per_s,
                    summary["train_images_per_sec"], _format_eta(eta))
                train_metrics = None
                last_log_time, last_log_step = time.time(), step
            if actions.evaluate:
                result = run_eval(step)
            if actions.checkpoint:
                ckpt.save(step, state)
            if stopped:
                logging.warning("Stopped at step %d; rerun the same command to resume.", step)
                break
        else:
            if start_step >= total_steps:
                logging.info("Workdir already holds the final step %d.", total_steps)
                result = run_eval(total_steps)
    finally:
        stop.restore()
        ckpt.close()
        writer.flush()
    if result and not stopped:
        logging.info("Final %s accuracy: %.4f over %d examples.", input_cfg.eval_split,
                     result["accuracy"], result["num_examples"])
    return result


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"

