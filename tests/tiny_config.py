"""A ResNet-50 shrunk to a few thousand parameters on 32px digits, for the tests that run
whole training processes (multi-process, SIGTERM/SIGKILL resume; seconds per run)::

    --config=tests/tiny_config.py:steps=40

The argument accepts configs/resnet50.py's arguments after ``digits``.
"""

import importlib.util
import os

import ml_collections

RESNET50 = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "resnet50.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("resnet50_config", RESNET50)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(",".join(filter(None, ["digits", arg])))
    c.model.update(stage_sizes=(1, 1, 1, 1), width=4, stem_width=8)
    c.data.image_size = 32
    c.batch_size, c.eval_batch_size = 32, 64
    c.optim.warmup_steps, c.optim.warmup_epochs = 2, -1.0
    c.optim.ema_decay = 0.9  # the EMA is part of the state that must resume exactly
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 10, 0, 10
    c.keep_checkpoints = 3
    return c
