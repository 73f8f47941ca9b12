"""Checkpoints through orbax's ``CheckpointManager``: periodic and final saves, keep-last-N,
atomic (orbax writes to a temporary directory and renames), automatic resume, and restore
onto any mesh (restore targets carry the current run's shardings, never the saved ones).

Each step holds two items: ``state`` (the train state) and ``meta`` (JSON: model name and
a config summary), so that a workdir of another model is refused with one sentence. A
newest step that cannot be read is moved to ``checkpoints.skipped/`` with a warning and
the previous one is used. A state with a non-finite value is never written.

Workdirs may be local paths or URLs such as ``gs://bucket/run`` (read through etils.epath).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from hybrid_attn import sharding

STATE, META = "state", "meta"


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another model (or another state layout) than this run's."""


class NonFiniteStateError(RuntimeError):
    """A state with NaN or Inf values was about to be checkpointed."""


def resolve(path: str) -> epath.Path:
    """A local path made absolute, or a URL (``gs://...``) kept as it is."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _manager(directory: epath.Path, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(**options),
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()},
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def is_finite(tree: Any) -> bool:
    """True when no float leaf of ``tree`` holds a NaN or an Inf."""
    return bool(_all_finite(tree))


def _layout(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Sorted (path, shape) of every leaf: what must agree for a restore to fit."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted((sharding.path_string(path), tuple(leaf.shape)) for path, leaf in leaves)


def _describe(meta: dict[str, Any] | None) -> str:
    if not meta:
        return "a model of unknown name (no metadata)"
    return f"{meta.get('model_name', '?')} ({meta.get('summary', '')})"


def _wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
    """A barrier of JAX's coordination service (long timeout; no-op in one process), met
    before the manager's directory sync, a run's first collective. Gloo sets up its
    connections there with a 30 s deadline; on a loaded 2-core machine, processes that
    reached it far apart failed with "Gloo context initialization failed:
    DEADLINE_EXCEEDED: GetKeyValue() timed out ... 30s"."""
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=f"hybrid_attn {name}",
                                            timeout_ms=int(timeout_s * 1000))


class Checkpointer:
    """Saves and restores the train state under ``<workdir>/checkpoints``.

    ``meta`` (JSON-serialisable; ``model_name`` and a ``summary`` string) is stored with
    every step and compared on restore.
    """

    def __init__(self, workdir: str, keep: int = 3, meta: dict[str, Any] | None = None):
        self.directory = resolve(workdir) / "checkpoints"
        self.meta = dict(meta or {})
        _wait_for_all_processes(f"checkpointer {self.directory}")  # see the function
        self._manager = _manager(self.directory, max_to_keep=keep, create=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves asynchronously; a save of an already-saved step is skipped. Raises
        NonFiniteStateError rather than write a NaN/Inf state (so keep-last-N never
        deletes a good checkpoint in favour of a broken one)."""
        if step in self._manager.all_steps():
            return
        if not is_finite(state):
            raise NonFiniteStateError(f"Refusing to checkpoint step {step}: the state holds "
                                      "NaN or Inf values")
        self._manager.save(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(self.meta)}
        ))

    def restore(self, target: Any) -> tuple[Any, int] | None:
        """The newest readable step restored into the structure, dtypes and shardings of
        ``target`` (arrays or ``ShapeDtypeStruct``s with ``.sharding``), and its number;
        None when the workdir holds no checkpoint.

        A step that cannot be read is moved aside with a warning and the previous one is
        tried. A step of another model raises CheckpointMismatchError.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._manager.restore(step, args=ocp.args.Composite(
                    **{META: ocp.args.JsonRestore()}))[META]
                saved = self._manager.item_metadata(step)[STATE]
                saved_tree = getattr(saved, "tree", saved)
            except Exception as e:  # noqa: BLE001 -- any unreadable step is skipped
                self._skip(step, e)
                continue
            self._check_same_model(step, meta, saved_tree, abstract)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    **{STATE: ocp.args.StandardRestore(abstract)}))[STATE]
            except Exception as e:  # noqa: BLE001
                self._skip(step, e)
                continue
            return restored, step
        return None

    def _check_same_model(self, step: int, meta: dict, saved_tree: Any, abstract: Any) -> None:
        same_name = meta.get("model_name") == self.meta.get("model_name")
        if same_name and _layout(saved_tree) == _layout(abstract):
            return

        def model_part(tree):
            return [leaf for leaf in _layout(tree) if not leaf[0].startswith("opt_state/")]

        if same_name and model_part(saved_tree) == model_part(abstract):
            raise CheckpointMismatchError(
                f"{self.directory}/{step} holds this model, but its optimizer state has "
                "another layout than this run's (config.optim differs from the run that "
                "wrote it: name, grad_clip_norm > 0 or not, flat_state): resume with the "
                "same optim settings, or pass the checkpoint as config.init_checkpoint to "
                "start from its weights with a fresh optimizer."
            )
        raise CheckpointMismatchError(
            f"{self.directory}/{step} holds a checkpoint of {_describe(meta)}, but this run "
            f"trains {_describe(self.meta)}: use another --workdir, or pass the checkpoint "
            "as config.init_checkpoint to start from its weights."
        )

    def _skip(self, step: int, error: Exception) -> None:
        """Moves an unreadable step to ``checkpoints.skipped/`` (kept for inspection, out
        of keep-last-N and resume) once every process has tried to read it."""
        bad = self.directory / str(step)
        aside = self.directory.parent / "checkpoints.skipped" / f"{step}.{int(time.time())}"
        logging.warning("Checkpoint %s is unreadable (%s: %s); moving it to %s and trying "
                        "the previous one.", bad, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "", aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-skip-{step}-read")
        if jax.process_index() == 0 and bad.exists():
            aside.parent.mkdir(parents=True, exist_ok=True)
            bad.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-skip-{step}-moved")
        self._manager.reload()

    def close(self) -> None:
        """Waits for the pending async save to commit, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def load_variables(path: str) -> dict[str, Any]:
    """Reads ``params``, ``batch_stats`` and ``ema`` (plus the stored ``meta``) of a saved
    train state from an explicit checkpoint directory (``<workdir>/checkpoints/<step>``)
    onto this process's first device, whatever mesh or process count saved it (the
    restore targets are built from the saved shapes with this device's sharding); e.g. to
    start fine-tuning at another resolution or to evaluate on its own."""
    path = resolve(path.rstrip("/"))
    if not path.name.isdigit():
        raise ValueError(f"Expected a <workdir>/checkpoints/<step> directory, got {path}")
    if not (path / STATE).exists():
        raise FileNotFoundError(f"No checkpoint at {path} (expected a {STATE}/ item in it)")
    step = int(path.name)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _manager(path.parent, read_only=True) as manager:
        saved = manager.item_metadata(step)[STATE]
        tree = getattr(saved, "tree", saved)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, np.dtype(m.dtype), sharding=device), tree
        )
        logging.info("Loading variables from %s", path)
        restored = manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
    state = restored[STATE]
    return {
        "params": state["params"],
        "batch_stats": state.get("batch_stats") or {},
        "ema": state.get("ema"),
        "meta": restored[META] or {},
    }
