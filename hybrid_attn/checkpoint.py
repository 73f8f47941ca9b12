"""Checkpoints through orbax's ``CheckpointManager``: periodic and final saves, keep-last-N,
atomic (orbax writes to a temporary directory and renames), automatic resume, and restore
onto any device count (restore targets carry the current run's shardings).

Workdirs may be local paths or URLs such as ``gs://bucket/run`` (read through etils.epath).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def resolve(path: str) -> epath.Path:
    """A local path made absolute, or a URL (``gs://...``) kept as it is."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


class Checkpointer:
    """Saves and restores the train state under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = resolve(workdir) / "checkpoints"
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

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_variables(path: str) -> dict[str, Any]:
    """Reads ``params``, ``batch_stats`` and ``ema`` of a saved train state from an
    explicit checkpoint directory (``<workdir>/checkpoints/<step>``) onto this process's
    first device, whatever device count saved it; e.g. to start fine-tuning at another
    resolution (the caller resizes position tables) or to evaluate on its own."""
    path = resolve(path.rstrip("/"))
    if not path.name.isdigit():
        raise ValueError(f"Expected a <workdir>/checkpoints/<step> directory, got {path}")
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}")
    step = int(path.name)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(path.parent) as manager:
        metadata = manager.item_metadata(step)
        tree = getattr(metadata, "tree", metadata)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
        )
        logging.info("Loading variables from %s", path)
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return {
        "params": restored["params"],
        "batch_stats": restored.get("batch_stats") or {},
        "ema": restored.get("ema"),
    }
