"""Entry point: ``python -m hybrid_attn.main --config=configs/coatnet0.py:digits --workdir=DIR``.

Restarts itself with glibc tunables that keep large blocks mapped on a CPU-only install
(``hybrid_attn.host_malloc``), parses flags, starts the multi-process runtime
(``hybrid_attn.distributed``), logs the hosts and devices, and calls
``train.train_and_evaluate``. Bad input (a config typo, a workdir of another model, a
diverging run) ends with one line on stderr and exit code 1 (2 for flag errors).
"""

from __future__ import annotations

if __name__ == "__main__":  # before jax loads: glibc tunables are read at process start
    from hybrid_attn import host_malloc

    host_malloc.configure_process()

import logging as std_logging
import sys
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hybrid_attn import checkpoint, config_lib, distributed, train
from hybrid_attn.data.input_pipeline import DatasetNotPreparedError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/coatnet0.py:digits", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing, but a bad flag or ``--config`` (unknown key, wrong type, invalid
    value) exits with one line naming it instead of a traceback through ml_collections."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        sys.stderr.write(f"Invalid flags: {_innermost_message(e)}\n")
        sys.exit(2)


def _innermost_message(error: BaseException) -> str:
    """The first message in the exception chain that is not a wrapped traceback, on one
    line (ml_collections wraps a config error in two layers of traceback text)."""
    while "Traceback" in str(error) and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    text = str(error.args[0] if error.args else error)
    text = text.replace("\\n", " ").replace("\\'", "'").strip("'")
    return " ".join(text.split())


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
    distributed.initialize_from_flags()
    logging.info("JAX process %d of %d; %d local / %d global devices: %s",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices())
    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (DatasetNotPreparedError, checkpoint.CheckpointMismatchError,
            config_lib.ConfigError, train.NonFiniteLossError) as e:
        raise SystemExit(str(e)) from None
    if result and jax.process_index() == 0:
        print(f"Final {FLAGS.config.data.eval_split} accuracy: {result['accuracy']:.4f} "
              f"({result['num_examples']} examples)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
