"""Exact evaluation over a whole split: every example once (the pipeline pads the last
batch and marks padding with ``mask``), also usable on its own from a checkpoint::

    python -m hybrid_attn.evaluate --config=configs/coatnet0.py:digits --workdir=runs/x
"""


from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import numpy as np
import optax
from clu import metrics
from jax.sharding import Mesh

from hybrid_attn import sharding


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    accuracy: metrics.Accuracy
    loss: metrics.Average.from_output("loss")


def make_eval_step(model: flax.linen.Module) -> Callable[[Any, dict], EvalMetrics]:
    """A jitted ``(variables, global_batch) -> EvalMetrics`` that ignores masked examples."""

    def step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return EvalMetrics.single_from_model_output(
            logits=logits, labels=batch["label"], loss=loss, mask=batch["mask"]
        )

    return jax.jit(step)


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


def eval_variables(params: Any, batch_stats: Any, ema: Any = None) -> dict[str, Any]:
    """The variables a model is evaluated with: the EMA ones (``{"params",
    "batch_stats"}``) when kept."""
    if ema is not None:
        params, batch_stats = ema["params"], ema["batch_stats"]
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def main(argv: list[str]) -> None:
    """Evaluates the newest (or ``--step``) checkpoint of ``--workdir`` on ``--split``."""
    from absl import logging

    from hybrid_attn import checkpoint
    from hybrid_attn.data import input_pipeline
    from hybrid_attn.train import build_model

    del argv
    config = FLAGS.config
    input_cfg = input_pipeline.InputConfig.from_config(config.data)
    split = FLAGS.split or input_cfg.eval_split
    ckpt_dir = checkpoint.resolve(FLAGS.workdir) / "checkpoints"
    steps = []
    if ckpt_dir.exists():
        steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
    step = FLAGS.step if FLAGS.step >= 0 else max(steps, default=None)
    if step is None:
        raise SystemExit(f"No checkpoint in {ckpt_dir}: train first with hybrid_attn.main")
    loaded = checkpoint.load_variables(str(ckpt_dir / str(step)))
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    model = build_model(config)
    variables = jax.device_put(
        eval_variables(loaded["params"], loaded["batch_stats"], loaded["ema"]),
        sharding.replicated(mesh),
    )
    batches = input_pipeline.eval_iterator(
        input_cfg, split, global_batch_size=config.eval_batch_size
    )
    result = evaluate(make_eval_step(model), variables, batches, mesh)
    logging.info("Checkpoint step %d, split %r: %s", step, split, result)
    print(f"step {step} {split}: accuracy {result['accuracy']:.4f} "
          f"loss {result['loss']:.4f} over {result['num_examples']} examples")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
    flags.DEFINE_string("split", "", "Split to evaluate (default: the config's eval split).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: newest).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
