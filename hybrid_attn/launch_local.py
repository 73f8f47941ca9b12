"""Runs N processes on this machine as one JAX multi-process job, the way a pod or a
SLURM allocation would (one coordinator on localhost, CPU collectives over gloo)::

    python -m hybrid_attn.launch_local --num_processes=2 -- \\
        --config=configs/coatnet0.py:digits --workdir=/tmp/run

Each process gets ``--jax_distributed --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I`` before the given arguments, and
``--devices_per_process`` fake CPU devices. Output lines are prefixed with ``[pI]``.
SIGTERM/SIGINT to the launcher is forwarded to every process (they save and exit); when
one process fails, the others are stopped rather than left waiting in a collective.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_cpu_devices(xla_flags: str, count: int) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) with its fake-CPU-device count replaced by
    ``count``; every other flag is kept."""
    flags = [f for f in xla_flags.split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def _copy_lines(src: IO[bytes], prefix: bytes, dst: IO[bytes]) -> None:
    for line in iter(src.readline, b""):
        dst.write(prefix + line)
        dst.flush()


def start(
    num_processes: int,
    args: Sequence[str],
    *,
    module: str = "hybrid_attn.main",
    devices_per_process: int = 1,
    env: dict[str, str] | None = None,
    output: IO[bytes] | None = None,
) -> list[subprocess.Popen]:
    """Starts the ``num_processes`` processes of ``python -m module ARGS`` and returns them;
    their merged output goes to ``output`` (default: this process's stdout), prefixed."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"need num_processes >= 1 and devices_per_process >= 1, got "
                         f"{num_processes} and {devices_per_process}")
    port = free_port()
    env = {**os.environ, **(env or {})}
    env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), devices_per_process)
    env.setdefault("JAX_PLATFORMS", "cpu")
    output = output or sys.stdout.buffer
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", module, "--jax_distributed",
               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
               f"--process_id={i}", *args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        proc.copier = threading.Thread(  # joined by wait(): its output is complete then
            target=_copy_lines, args=(proc.stdout, f"[p{i}] ".encode(), output), daemon=True)
        proc.copier.start()
        procs.append(proc)
    return procs


def wait(procs: Sequence[subprocess.Popen], *, timeout: float | None = None,
         grace: float = 20.0) -> list[int]:
    """Waits for every process and returns their exit codes, once their output is copied.
    Once one has failed, the others get ``grace`` seconds and are then killed; past
    ``timeout`` all are killed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if (failed_at is not None and now - failed_at > grace) or (
                deadline is not None and now > deadline):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    codes = [p.wait() for p in procs]
    for p in procs:
        if getattr(p, "copier", None) is not None:
            p.copier.join(timeout=30)
    return codes


def signal_all(procs: Sequence[subprocess.Popen], signum: int) -> None:
    """Sends ``signum`` to every process still running."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python -m hybrid_attn.launch_local --num_processes=N [options] -- ARGS...")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--module", default="hybrid_attn.main",
                        help="hybrid_attn.main (train) or hybrid_attn.evaluate")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for every process")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    procs = start(ns.num_processes, args, module=ns.module,
                  devices_per_process=ns.devices_per_process)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: signal_all(procs, signal.SIGTERM))
    codes = wait(procs)
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
