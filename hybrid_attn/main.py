"""Entry point: ``python -m hybrid_attn.main --config=configs/coatnet0.py:digits --workdir=DIR``.

Parses flags, logs the hosts and devices, and calls ``train.train_and_evaluate``.
"""

from __future__ import annotations

import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hybrid_attn import train
from hybrid_attn.data.input_pipeline import DatasetNotPreparedError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/coatnet0.py:digits", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first (multi-host TPU pods, SLURM/GPU clusters).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_third_party_info() -> None:
    """Keeps the console to our progress lines: drops INFO records from orbax and tfds."""
    noisy = ("/orbax/", "/tensorflow_datasets/", "/clu/metric_writers/", "/clu/platform/")

    def keep(record) -> bool:
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().addFilter(keep)


def main(argv: list[str]) -> None:
    _quiet_third_party_info()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.jax_distributed:
        jax.distributed.initialize()
    logging.info("JAX process %d of %d; %d local / %d global devices: %s",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices())
    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except DatasetNotPreparedError as e:
        raise SystemExit(str(e)) from None
    if result and jax.process_index() == 0:
        print(f"Final {FLAGS.config.data.eval_split} accuracy: {result['accuracy']:.4f} "
              f"({result['num_examples']} examples)")


if __name__ == "__main__":
    app.run(main)
