"""Exact evaluation over a whole split: every example once (the pipeline pads the last
batch and marks padding with ``mask``), also usable on its own from a checkpoint, in code
(``evaluate_checkpoint(config, workdir)``) or from the shell::

    python -m hybrid_attn.evaluate --config=configs/coatnet0.py:digits --workdir=runs/x
"""

if __name__ == "__main__":  # before jax loads: glibc tunables are read at process start
    from hybrid_attn import host_malloc

    host_malloc.configure_process()

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metrics
from etils import epath
from jax.sharding import Mesh

from hybrid_attn import checkpoint, config_lib, sharding, viz, xla_cpu
from hybrid_attn.convert import pretrained
from hybrid_attn.data import input_pipeline
from hybrid_attn.models.build import build_model
from hybrid_attn.models.capture import attention_maps


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    accuracy: metrics.Accuracy
    loss: metrics.Average.from_output("loss")


def make_eval_step(model: flax.linen.Module) -> Callable[[Any, dict], EvalMetrics]:
    """A jitted ``(variables, global_batch) -> EvalMetrics`` that ignores masked examples
    (compiled with :func:`hybrid_attn.xla_cpu.compiler_options` for the default backend)."""

    def step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return EvalMetrics.single_from_model_output(
            logits=logits, labels=batch["label"], loss=loss, mask=batch["mask"]
        )

    return jax.jit(step, compiler_options=xla_cpu.compiler_options(jax.default_backend()))


def evaluate(
    eval_step: Callable[[Any, dict], EvalMetrics],
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
) -> dict[str, float]:
    """Runs ``eval_step`` over process-local numpy batches; returns accuracy, loss and the
    number of (unmasked) examples seen, which equals the split size."""
    merged = None
    for local in batches:
        m = eval_step(variables, sharding.to_global(local, mesh))
        merged = m if merged is None else merged.merge(m)
    if merged is None:
        raise ValueError("evaluation got no batches: is the eval split empty?")
    result = merged.compute()
    return {
        "accuracy": float(result["accuracy"]),
        "loss": float(result["loss"]),
        "num_examples": int(merged.accuracy.count),
    }


def attention_images(model: flax.linen.Module, variables: Any, images: np.ndarray,
                     max_layers: int = 4) -> np.ndarray:
    """uint8 ``[N * L, H, W, 3]`` TensorBoard pictures of what the model's first ``L <=
    max_layers`` attention layers look at: each image with its centre query's head-mean
    weights (:func:`hybrid_attn.viz.attention_summary_images`); empty for a model
    without attention. Compiles one capturing forward pass per call."""
    return viz.attention_summary_images(np.asarray(images),
                                        attention_maps(model, variables, images), max_layers)


def eval_variables(params: Any, batch_stats: Any, ema: Any = None) -> dict[str, Any]:
    """The variables a model is evaluated with: the EMA ones (``{"params",
    "batch_stats"}``) when kept."""
    if ema is not None:
        params, batch_stats = ema["params"], ema["batch_stats"]
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def find_checkpoint(workdir_or_checkpoint: str, step: int | None = None) -> epath.Path:
    """The checkpoint to read: ``workdir_or_checkpoint`` itself when it is a
    ``<workdir>/checkpoints/<step>`` directory, else the workdir's newest committed step
    (or ``step``), as orbax lists them (uncommitted temporary saves are not steps)."""
    path = checkpoint.resolve(workdir_or_checkpoint.rstrip("/"))
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is step {path.name}, not the requested step {step}")
        return path
    directory = path / "checkpoints"
    steps = []
    if directory.exists():
        options = ocp.CheckpointManagerOptions(read_only=True)
        with ocp.CheckpointManager(directory, options=options) as manager:
            steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {directory}: train first with "
                                "hybrid_attn.main, or pass a <workdir>/checkpoints/<step> path")
    if step is None:
        return directory / str(max(steps))
    if step not in steps:
        raise FileNotFoundError(f"No step {step} in {directory}; saved steps: {sorted(steps)}")
    return directory / str(step)


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir_or_checkpoint: str,
    *,
    split: str | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Evaluates a saved run of ``config``'s model on ``split`` (default: the config's
    eval split) with the weights its own evaluations used (the EMA ones when kept).

    ``workdir_or_checkpoint`` is a training workdir (its newest step, or ``step``) or one
    ``<workdir>/checkpoints/<step>`` directory. Returns ``accuracy``, ``loss``,
    ``num_examples`` (the split size), ``step`` and ``split``.
    """
    config_lib.check(config)
    input_cfg = input_pipeline.InputConfig.from_config(config.data)
    split = split or input_cfg.eval_split
    path = find_checkpoint(workdir_or_checkpoint, step)
    loaded = checkpoint.load_variables(str(path))
    saved_model = loaded["meta"].get("model_name")
    if saved_model not in (None, config.model_name):
        raise checkpoint.CheckpointMismatchError(
            f"{path} holds a checkpoint of {saved_model}, but the config is of "
            f"{config.model_name}: pass that model's config")
    model = build_model(config)
    if "preprocessing" in loaded["meta"]:  # imported by hybrid_attn.convert: timm's recipe
        input_cfg = pretrained.recorded_eval_input(input_cfg, loaded["meta"])
        model = pretrained.model_from_meta(loaded["meta"], dtype=model.dtype)
    # The config's devices (sharding.num_devices); the weights are replicated (no fsdp).
    sharding_cfg = sharding.ShardingConfig.from_config(config.get("sharding"))
    mesh = sharding.config_mesh(dataclasses.replace(sharding_cfg, fsdp=1))
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    variables = jax.device_put(
        eval_variables(loaded["params"], loaded["batch_stats"], loaded["ema"]),
        sharding.replicated(mesh),
    )
    batches = input_pipeline.eval_iterator(
        input_cfg, split, global_batch_size=config.eval_batch_size
    )
    result = evaluate(make_eval_step(model), variables, batches, mesh)
    return {**result, "step": int(path.name), "split": split}


def main(argv: list[str]) -> None:
    """CLI: evaluates the newest (or ``--step``) checkpoint of ``--workdir`` on ``--split``."""
    from absl import flags, logging

    from hybrid_attn import distributed

    del argv
    distributed.initialize_from_flags()  # --jax_distributed [--coordinator_address ...]
    flag = flags.FLAGS
    result = evaluate_checkpoint(flag.config, flag.workdir, split=flag.split or None,
                                 step=None if flag.step < 0 else flag.step)
    logging.info("Checkpoint step %d, split %r: %s", result["step"], result["split"], result)
    print(f"step {result['step']} {result['split']}: accuracy {result['accuracy']:.4f} "
          f"loss {result['loss']:.4f} over {result['num_examples']} examples")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    import hybrid_attn.distributed  # noqa: F401  (defines the --jax_distributed flags)

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir, or one <workdir>/checkpoints/<step>.")
    flags.DEFINE_string("split", "", "Split to evaluate (default: the config's eval split).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: newest).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
