"""Converts a timm weight file into a checkpoint the trainer, evaluator and predictor read::

    python -m hybrid_attn.convert --timm resnet50.a1_in1k \
        --checkpoint model.safetensors --workdir runs/resnet50_a1

writes ``<workdir>/checkpoints/0`` (``hybrid_attn.checkpoint``'s format) holding the
variables and, as metadata, the model name and fields, the timm weights' name, the class
count and timm's preprocessing for those weights. ``.safetensors`` files need only numpy;
``.pth``/``.bin`` files need torch. Bad input (an unknown name, a missing or unreadable
file, another architecture's tensors, no torch) ends with one line and exit code 2.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from hybrid_attn.convert import io, pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("timm", None, "timm model name, e.g. resnet50 or resnet50.a1_in1k.")
flags.DEFINE_string("checkpoint", None, "The timm weights: .safetensors, or .pth/.bin.")
flags.DEFINE_string("workdir", None, "Directory to write checkpoints/0 into (must be new).")
flags.DEFINE_string("model_overrides", "", "JSON object of model fields to replace (e.g. a "
                    "reduced test model); skips the check against timm's full-size shapes.")


def convert_file(timm_name: str, checkpoint_file: str, workdir: str,
                 model_overrides: dict | None = None) -> str:
    """Converts ``checkpoint_file`` and saves it as step 0 of ``workdir``; returns the
    checkpoint directory. Raises ValueError / FileNotFoundError / MissingTorchError."""
    from hybrid_attn import checkpoint

    state_dict = io.read_state_dict(checkpoint_file)
    imported = pretrained.import_timm(timm_name, state_dict, **(model_overrides or {}))
    ckpt = checkpoint.Checkpointer(workdir, keep=1, meta=imported.meta)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise ValueError(f"{ckpt.directory} already holds a checkpoint; convert into a new "
                         "--workdir")
    try:
        ckpt.save(0, {k: imported.variables[k] for k in ("params", "batch_stats")
                      if imported.variables.get(k)})
    finally:
        ckpt.close()
    return str(ckpt.directory / "0")


def one_line(error: Exception) -> str:
    """The error's message on one line: a list of problems becomes its first entry and how
    many more there are."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {lines[1]}{more}"


def main(argv: list[str]) -> None:
    from absl import logging

    from hybrid_attn import checkpoint

    logging.set_verbosity(logging.WARNING)

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        overrides = json.loads(FLAGS.model_overrides) if FLAGS.model_overrides else {}
        if not isinstance(overrides, dict):
            raise ValueError("--model_overrides must be a JSON object")
        path = convert_file(FLAGS.timm, FLAGS.checkpoint, FLAGS.workdir, overrides)
    except (ValueError, FileNotFoundError, io.MissingTorchError,
            checkpoint.NonFiniteStateError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {path} ({FLAGS.timm}). Fine-tune with --config.init_checkpoint={path}; "
          f"predict with python -m hybrid_attn.predict --checkpoint {path} IMAGE...")


if __name__ == "__main__":
    flags.mark_flags_as_required(["timm", "checkpoint", "workdir"])
    app.run(main)
