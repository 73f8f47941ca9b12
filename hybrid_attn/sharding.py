"""Device mesh and shardings declared by rules over parameter paths (big_vision style).

The mesh has two named axes, ``data`` and ``fsdp``; the batch is split over both, so
every device sees a distinct slice of it. Each leaf of the train state (parameters,
optimizer state, EMA, BatchNorm statistics) is placed by the first rule whose regex
matches its path (``params/stage3/block0/attn/qkv/kernel``,
``opt_state/1/0/mu/stage3/...``):

- ``"fsdp"``: split the largest dimension that the ``fsdp`` axis size divides over that
  axis (replicated when none does, or when the leaf has fewer than ``min_fsdp_elements``
  elements, where the all-gathers would cost more than the memory saved);
- ``"replicate"``: a full copy on every device.

With ``fsdp=1`` (the default) everything is replicated, the plain data-parallel layout
that suits small models. Since optimizer moments have the shapes of their parameters, one
rule places a parameter and its moments alike. Everything is ``jax.jit`` over global
arrays with explicit ``NamedSharding``s (the modern form of pjit); there is no pmap.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
RULE_KINDS = ("fsdp", "replicate")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Typed view of ``config.sharding``.

    ``fsdp``: devices on the ``fsdp`` axis (1: replicate everything; -1: all devices);
    the ``data`` axis takes the remaining factor. ``rules``: ``(regex, kind)`` pairs,
    first match wins, unmatched leaves are replicated. ``num_devices``: 0 (default) uses
    every device of every process; N > 0 uses the first N devices of a one-process run
    (a quick run on part of a host, or the tests' tiny trainings on 1 of 8 fake CPU devices).
    """

    fsdp: int = 1
    num_devices: int = 0
    rules: tuple[tuple[str, str], ...] = ((".*", "fsdp"),)
    min_fsdp_elements: int = 2**12

    def __post_init__(self) -> None:
        rules = tuple((str(r), str(k)) for r, k in self.rules)
        object.__setattr__(self, "rules", rules)
        if self.fsdp == 0 or self.fsdp < -1:
            raise ValueError(f"sharding.fsdp must be >= 1 or -1 (all devices), got {self.fsdp}")
        if self.num_devices < 0:
            raise ValueError(f"sharding.num_devices must be 0 (all devices) or a device "
                             f"count >= 1, got {self.num_devices}")
        for regex, kind in rules:
            if kind not in RULE_KINDS:
                raise ValueError(f"sharding rule {regex!r}: kind must be one of {RULE_KINDS}, "
                                 f"got {kind!r}")
            re.compile(regex)

    @classmethod
    def from_config(cls, c: Mapping[str, Any] | None) -> ShardingConfig:
        """From ``config.sharding`` (a ConfigDict, mapping, or None for the defaults)."""
        values = {} if c is None else (c.to_dict() if hasattr(c, "to_dict") else dict(c))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown sharding config keys {unknown}; valid: {sorted(known)}")
        return cls(**values)


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices of all processes).

    Devices keep JAX's order (grouped by process), so each process's devices hold a
    contiguous part of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = n if fsdp == -1 else fsdp
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"sharding.fsdp={fsdp} must divide the device count {n} (or be -1)")
    return Mesh(np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp), BATCH_AXES)


def config_mesh(cfg: ShardingConfig) -> Mesh:
    """The mesh of ``config.sharding``: :func:`make_mesh` over every device, or over the
    first ``num_devices`` of a one-process run (a clear error otherwise)."""
    if not cfg.num_devices:
        return make_mesh(fsdp=cfg.fsdp)
    available = jax.devices()
    if jax.process_count() > 1:
        raise ValueError(f"sharding.num_devices={cfg.num_devices} is for one-process runs; "
                         f"this run has {jax.process_count()} processes (use 0: all devices)")
    if cfg.num_devices > len(available):
        raise ValueError(f"sharding.num_devices={cfg.num_devices} exceeds the "
                         f"{len(available)} devices of this process")
    return make_mesh(available[:cfg.num_devices], fsdp=cfg.fsdp)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over both mesh axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices and processes."""
    n = mesh.devices.size
    if global_batch < 1 or global_batch % n or global_batch % jax.process_count():
        raise ValueError(
            f"{what}={global_batch} must be a positive multiple of the number of devices "
            f"({n}) and processes ({jax.process_count()})"
        )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local numpy batch into global arrays split over the batch
    axes (process ``p`` holds rows ``[p * local, (p + 1) * local)``)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def path_string(path: tuple) -> str:
    """``params/stage3/block0/attn/kernel`` for a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], axis_size: int, min_elements: int) -> PartitionSpec:
    if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_elements, 1):
        return PartitionSpec()
    candidates = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % axis_size == 0]
    if not candidates:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[int(candidates[0])] = FSDP_AXIS
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, cfg: ShardingConfig) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ShapeDtypeStructs) by the
    first matching rule of ``cfg`` (see the module docstring)."""
    axis_size = mesh.shape[FSDP_AXIS]
    compiled = [(re.compile(regex), kind) for regex, kind in cfg.rules]

    def place(path, leaf) -> NamedSharding:
        name = path_string(path)
        kind = next((k for r, k in compiled if r.search(name)), "replicate")
        if kind == "fsdp":
            return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), axis_size,
                                                  cfg.min_fsdp_elements))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(place, tree)

