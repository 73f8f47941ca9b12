"""``train_and_evaluate``: state creation, the jitted step, the loop, and when to log,
evaluate and checkpoint.

The step is ``jax.jit`` over global arrays on a ``(data, fsdp)`` device mesh: the batch
is split over every device, the state is placed by ``sharding``'s rules (replicated by
default, FSDP with ``config.sharding.fsdp > 1``) and created already placed
(``jax.eval_shape``, then a jitted init with ``out_shardings``), and the old state is
donated. Per-step randomness is ``fold_in(key, step)``, and the input pipeline is
deterministic, so a run resumed from a checkpoint repeats an uninterrupted one.

A non-finite loss or gradient norm stops the run (NonFiniteLossError, naming the step)
before anything is evaluated or saved, so the newest checkpoint stays the last good one;
the step that produced it leaves the parameters as they were.
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

from hybrid_attn import checkpoint, config_lib, evaluate, finetune, optim, sharding, xla_cpu
from hybrid_attn.data import input_pipeline
from hybrid_attn.models.build import build_model


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
@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
    """The first step (1-based) whose loss or gradient norm was not finite; 0 if none."""

    step: jax.Array

    @classmethod
    def from_model_output(cls, *, nonfinite_step: jax.Array, **_) -> "FirstNonFinite":
        return cls(step=jnp.asarray(nonfinite_step, jnp.int32))

    def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
        return type(self)(step=jnp.where(self.step > 0, self.step, other.step))

    def compute(self) -> jax.Array:
        return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Average.from_output("accuracy")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    first_nonfinite_step: FirstNonFinite


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; nothing of it was saved."""


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


def light_compiler_options(mesh: Mesh, light_codegen: bool = True) -> dict[str, Any] | None:
    """``jax.jit`` compiler options for the state's init and the train step on ``mesh``
    (:func:`hybrid_attn.xla_cpu.compiler_options`: on CPU the library choice and, when
    ``light_codegen``, LLVM at -O1; None, XLA's defaults, on GPU and TPU)."""
    return xla_cpu.compiler_options(mesh.devices.flat[0].platform, light_codegen)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    mesh: Mesh,
    *,
    ema: bool,
    sharding_cfg: sharding.ShardingConfig | None = None,
    light_codegen: bool = True,
) -> tuple[TrainState, Any]:
    """Initialises the state directly in the sharding ``sharding_cfg``'s rules give it (no
    device ever holds an unsharded copy); returns it and the sharding tree.
    ``light_codegen``: compile the init with :func:`light_compiler_options` (on CPU; the same
    parameters, 2-12 s less start-up for the 224-px models measured above)."""

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

    shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh,
                                        sharding_cfg or sharding.ShardingConfig())
    return jax.jit(init, out_shardings=shardings,
                   compiler_options=light_compiler_options(mesh, light_codegen))(rng), shardings


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    base_rng: jax.Array,
    ema_decay: float,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, TrainMetrics]:
    """One optimizer update on a global batch (``image`` NHWC, ``label`` soft targets
    [B, classes]).

    With ``grad_accum_steps = k > 1`` the batch is split into k microbatches (example i
    goes to microbatch ``i % k``, so each stays spread over every device) and a
    ``lax.scan`` averages their gradients: the update equals the one on the whole batch
    for a model without batch statistics. Every microbatch starts from the same
    BatchNorm statistics and the new statistics are their average, so the running
    averages still move once per update, as with one large batch. The learning-rate
    schedule, the EMA and ``state.step`` count updates, not microbatches.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    has_bn = bool(jax.tree_util.tree_leaves(state.batch_stats))

    def loss_fn(params, images, labels, micro_rng):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
        logits, updates = model.apply(
            variables, images, train=True,
            mutable=["batch_stats"] if has_bn else [], rngs={"dropout": micro_rng},
        )
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
        stats = updates["batch_stats"] if has_bn else state.batch_stats
        return loss, (accuracy, stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, (accuracy, batch_stats)), grads = grad_fn(
            state.params, batch["image"], batch["label"], rng)
    else:
        k = grad_accum_steps

        def split(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        def micro(carry, xs):
            images, labels, i = xs
            out = grad_fn(state.params, images, labels, jax.random.fold_in(rng, i))
            return jax.tree_util.tree_map(jnp.add, carry, out), None

        zeros = jax.tree_util.tree_map(
            jnp.zeros_like,
            jax.eval_shape(grad_fn, state.params, split(batch["image"])[0],
                           split(batch["label"])[0], rng))
        summed, _ = jax.lax.scan(
            micro, zeros, (split(batch["image"]), split(batch["label"]), jnp.arange(k)))
        (loss, (accuracy, batch_stats)), grads = jax.tree_util.tree_map(
            lambda x: x / k, summed)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # A non-finite step leaves the parameters as they were (the loop stops on it anyway).
    # The select also makes every parameter's update wait for the whole gradient, so that
    # XLA writes the donated parameters in place: without it, an update that could be
    # scheduled before its layer's input gradient made XLA copy each parameter first (145
    # copies in Twins-SVT-S's step without gradient clipping; with the bench's optimizer,
    # two threads, train step 854 -> 848 ms, one thread 1469 -> 1432 ms, CoAtNet-0 1826 ->
    # 1812 ms and ResNet-50 1150 -> 1128 ms at two threads, compiled both ways in one
    # process and alternated).
    param_updates = jax.tree_util.tree_map(
        lambda u: jnp.where(finite, u, jnp.zeros_like(u)), param_updates)
    params = optax.apply_updates(state.params, param_updates)
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
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss, accuracy=accuracy, grad_norm=grad_norm,
        learning_rate=schedule(state.step),
        nonfinite_step=jnp.where(finite, 0, state.step + 1),
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
    grad_accum_steps: int = 1,
    light_codegen: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """``train_step`` jitted with explicit shardings and the old state donated;
    ``light_codegen``: compiled with :func:`light_compiler_options` (on CPU)."""
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, base_rng=base_rng,
        ema_decay=ema_decay, grad_accum_steps=grad_accum_steps,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=light_compiler_options(mesh, light_codegen),
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

    def restore(self) -> None:
        """Reinstalls the previous handler; call it only once the last save has committed
        (a SIGTERM before that must not kill the process mid-save)."""
        signal.signal(signal.SIGTERM, self._previous)


def initial_state(
    state: TrainState,
    ckpt: checkpoint.Checkpointer,
    *,
    init_checkpoint: str,
    model: nn.Module,
    image_shape: tuple[int, ...],
) -> tuple[TrainState, str]:
    """Resume order: the workdir's newest readable checkpoint, else ``init_checkpoint``,
    else scratch.

    ``init_checkpoint`` gives weights only (fresh optimizer and step): its EMA weights when
    it kept them (the ones its evaluations reported), else its raw weights. It may come
    from another resolution: position tables are resized for ``image_shape`` (e.g. 224 ->
    384 fine-tuning); and for another class count: a new head (``finetune.load_pretrained``).
    """
    resumed = ckpt.restore(state)
    if resumed is not None:
        return resumed[0], f"workdir checkpoint at step {resumed[1]}"
    if not init_checkpoint:
        return state, "scratch"
    weights, kind = finetune.load_pretrained(
        init_checkpoint, {"params": state.params, "batch_stats": state.batch_stats},
        model, image_shape)
    state = state.replace(
        params=weights["params"], batch_stats=weights["batch_stats"],
        ema=_copy(weights) if state.ema is not None else None,
    )
    return state, f"init_checkpoint {init_checkpoint} ({kind}, fresh optimizer)"


def _copy(tree: Any) -> Any:
    """Distinct buffers, so that donating the state never donates one buffer twice."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the
    final evaluation metrics on the config's eval split."""
    config_lib.check(config)  # bad values fail here in one line, before any work
    sharding_cfg = sharding.ShardingConfig.from_config(config.get("sharding"))
    mesh = sharding.config_mesh(sharding_cfg)
    grad_accum_steps = config.get("grad_accum_steps", 1)
    if grad_accum_steps < 1 or config.batch_size % grad_accum_steps:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1 and divide "
                         f"batch_size={config.batch_size}")
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.batch_size // grad_accum_steps, mesh,
                              "batch_size / grad_accum_steps (the microbatch)")
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
        model, tx, init_rng, image_shape, mesh, ema=optim_cfg.ema_decay > 0,
        sharding_cfg=sharding_cfg,
    )
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    meta = {"model_name": config.model_name,
            "summary": f"{num_params / 1e6:.2f}M parameters, {input_cfg.num_classes} classes, "
                       f"{input_cfg.image_size}px"}
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints, meta=meta)
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
        model, tx, schedule, train_rng, optim_cfg.ema_decay, state_shardings, mesh,
        grad_accum_steps=grad_accum_steps,
    )
    eval_step_fn = evaluate.make_eval_step(model)
    train_iter = input_pipeline.train_iterator(
        input_cfg, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step
    )
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
        every_secs=None,
    )

    attention_inputs = None  # the first eval images, for TensorBoard attention pictures
    if config.get("eval_attention_images", 0) > 0:
        first = next(iter(input_pipeline.eval_iterator(
            input_cfg, input_cfg.eval_split, global_batch_size=config.eval_batch_size)))
        attention_inputs = first["image"][:config.eval_attention_images]

    def run_eval(step: int) -> dict[str, float]:
        variables = evaluate.eval_variables(state.params, state.batch_stats, state.ema)
        batches = input_pipeline.eval_iterator(
            input_cfg, input_cfg.eval_split, global_batch_size=config.eval_batch_size
        )
        result = evaluate.evaluate(eval_step_fn, variables, batches, mesh)
        writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items()})
        if attention_inputs is not None:  # config.eval_attention_images > 0
            pictures = evaluate.attention_images(model, variables, attention_inputs)
            if len(pictures):
                writer.write_images(step, {"eval_attention": pictures})
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
            if actions.log or actions.evaluate or actions.checkpoint:
                _check_finite(train_metrics, ckpt)
            if actions.log:
                summary = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()
                           if k != "first_nonfinite_step"}
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
        ckpt.close()  # waits for the last async save to commit ...
        stop.restore()  # ... before a SIGTERM may kill the process again
        writer.flush()
    if result and not stopped:
        logging.info("Final %s accuracy: %.4f over %d examples.", input_cfg.eval_split,
                     result["accuracy"], result["num_examples"])
    return result


def _check_finite(train_metrics: TrainMetrics, ckpt: checkpoint.Checkpointer) -> None:
    """Raises NonFiniteLossError naming the first step since the last check whose loss or
    gradient norm was NaN/Inf (the state after it is discarded, never saved)."""
    bad = int(train_metrics.first_nonfinite_step.compute())
    if bad:
        raise NonFiniteLossError(
            f"Non-finite loss or gradient at step {bad}: stopped without saving it; the "
            f"newest checkpoint (step {ckpt.latest_step()}) is intact. Lower "
            "optim.learning_rate or enable optim.grad_clip_norm, then rerun to resume.")


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"

