"""Checkpoints through orbax's ``CheckpointManager``: periodic and final saves, keep-last-N,
atomic (orbax writes to a temporary directory and renames), automatic resume, and restore
onto any device count (the restore target carries the current run's shardings).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Saves and restores the train state under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves asynchronously; a save of an already-saved step is skipped."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores ``step`` (default latest) into the structure, dtypes and shardings of
        ``target`` (a tree of arrays or ``jax.ShapeDtypeStruct``s with ``.sharding``)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_variables(path: str) -> dict[str, Any]:
    """Reads ``params``, ``batch_stats`` and ``ema_params`` of a saved train state from an explicit
    checkpoint directory (``<workdir>/checkpoints/<step>``) as host arrays, e.g. to start
    fine-tuning at another resolution (the caller resizes position tables)."""
    path = os.path.abspath(path.rstrip("/"))
    step = os.path.basename(path)
    if not step.isdigit():
        raise ValueError(f"init_checkpoint must be a <workdir>/checkpoints/<step> dir, got {path}")
    with ocp.CheckpointManager(os.path.dirname(path)) as manager:
        logging.info("Loading initial variables from %s", path)
        restored = manager.restore(int(step), args=ocp.args.StandardRestore())
    return {
        "params": restored["params"],
        "batch_stats": restored.get("batch_stats") or {},
        "ema_params": restored.get("ema_params"),
    }
