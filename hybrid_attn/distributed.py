"""Multi-process setup shared by ``hybrid_attn.main`` and ``hybrid_attn.evaluate``.

``--jax_distributed`` alone lets JAX detect the cluster (TPU pods, SLURM, ...); with
``--coordinator_address``, ``--num_processes`` and ``--process_id`` it works anywhere, e.g.
two processes on one machine::

    python -m hybrid_attn.main --jax_distributed --coordinator_address=127.0.0.1:12345 \\
        --num_processes=2 --process_id=0 --config=... --workdir=...

On CPU the processes exchange collectives over ``--cpu_collectives`` (gloo by default).
"""

from __future__ import annotations

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first: multi-host TPU pods and SLURM are detected; "
    "elsewhere also pass --coordinator_address, --num_processes and --process_id.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --jax_distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Total number of processes (with --jax_distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) (with --jax_distributed)."
)
_CPU_COLLECTIVES = flags.DEFINE_enum(
    "cpu_collectives", "gloo", ["gloo", "mpi"],
    "Cross-process collectives on CPU (jax_cpu_collectives_implementation).",
)


def initialize_from_flags() -> None:
    """Calls ``jax.distributed.initialize`` when ``--jax_distributed`` is set, with the
    explicit flags (if given) overriding cluster detection. Raises ValueError naming what
    is missing when only some of the three flags are given."""
    explicit = {
        "coordinator_address": _COORDINATOR.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if not _DISTRIBUTED.value:
        if given:
            raise ValueError(f"--{', --'.join(given)} need --jax_distributed")
        return
    if given and len(given) < len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise ValueError(
            f"--jax_distributed with explicit flags also needs --{', --'.join(missing)}")
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    jax.distributed.initialize(**given)
