"""Device mesh and shardings: the batch is split over every device, parameters replicated.

Everything is ``jax.jit`` over global arrays with explicit ``NamedSharding``s (the modern
form of pjit); there is no pmap. A single ``data`` mesh axis spans all devices of all
processes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices and processes."""
    n = mesh.devices.size
    if global_batch % n or global_batch % jax.process_count():
        raise ValueError(
            f"{what}={global_batch} must be divisible by the number of devices ({n}) "
            f"and processes ({jax.process_count()})"
        )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local numpy batch into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    """Shardings that replicate every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
