"""Preemption sweep: SIGKILL a training run at random moments, restart it each time, and
check that nothing is lost and the result is bit-identical to an uninterrupted run.

    python launch/sigkill_sweep.py --kills=20 --steps=300 --out=/tmp/sweep

1. An uninterrupted reference run saves a checkpoint every ``--every`` steps (all kept).
2. The swept run is started in its own workdir and killed with SIGKILL after a uniform
   random delay in [0, half the reference's wall time] (so kills land in imports,
   compilation, steps and async saves), then restarted, ``--kills`` times, and finally
   run to completion. A run that ends before its kill starts over in a fresh workdir.
3. Reported: resumes that worked (each restart started from the newest checkpoint that
   was committed when the previous process died), checkpoints lost (committed before a
   kill, missing or unreadable afterwards), and checkpoints bit-equal to the reference's
   checkpoint of the same step (every one, including the final state).

Not part of the test suite (minutes of run time); restarts share a JAX compilation cache.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
RESUMED = re.compile(r"starting from (?:workdir checkpoint at step (\d+)|scratch)")


def committed_steps(workdir: str) -> set[int]:
    """Steps orbax has committed (a temporary save directory has a suffix)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return set()
    return {int(name) for name in os.listdir(directory) if name.isdigit()}


def command(args: argparse.Namespace, workdir: str) -> list[str]:
    return [sys.executable, "-m", "hybrid_attn.main",
            f"--config={REPO}/tests/tiny_config.py:steps={args.steps}",
            f"--config.checkpoint_every_steps={args.every}",
            "--config.keep_checkpoints=100000", f"--workdir={workdir}"]


def start(args: argparse.Namespace, workdir: str, log: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": args.out.rstrip("/") + "_jax_cache"}
    with open(log, "wb") as f:
        return subprocess.Popen(command(args, workdir), env=env, stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO)


def resumed_from(log: str) -> int | None:
    """The step a run's log says it started from (0 for scratch); None if it died first."""
    with open(log, errors="replace") as f:
        m = RESUMED.search(f.read())
    return None if m is None else int(m.group(1) or 0)


def bit_equal(a: str, b: str) -> bool:
    import jax
    import numpy as np

    from hybrid_attn import checkpoint

    x, y = checkpoint.load_variables(a), checkpoint.load_variables(b)
    x.pop("meta"), y.pop("meta")
    if jax.tree_util.tree_structure(x) != jax.tree_util.tree_structure(y):
        return False
    return all(np.array_equal(p, q) for p, q in
               zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5, help="checkpoint period in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/sigkill_sweep")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rng = random.Random(args.seed)
    ref, swept = os.path.join(args.out, "reference"), os.path.join(args.out, "swept")

    t0 = time.monotonic()
    if start(args, ref, os.path.join(args.out, "reference.log")).wait():
        print("reference run failed; see reference.log")
        return 1
    ref_time = time.monotonic() - t0
    print(f"reference: {args.steps} steps in {ref_time:.0f}s, "
          f"checkpoints {sorted(committed_steps(ref))[:3]}...{max(committed_steps(ref))}")

    resumes_ok, resumes_seen, finished_early = 0, 0, 0
    kills = 0
    attempt = 0
    expected_start = 0
    while kills < args.kills:
        log = os.path.join(args.out, f"run{attempt:02d}.log")
        attempt += 1
        proc = start(args, swept, log)
        delay = rng.uniform(0, ref_time / 2)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            before = committed_steps(swept)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            finished_early += 1  # ran to the end before the kill: start over
        started = resumed_from(log)
        ok = started is None or started == expected_start
        if started is not None:
            resumes_ok += ok
            resumes_seen += 1
        print(f"run {attempt:2d}: started from step {started} (expected {expected_start}: "
              f"{'ok' if ok else 'WRONG'}); "
              + (f"killed after {delay:.1f}s; committed then: {max(before, default=0)}"
                 if proc.returncode == -signal.SIGKILL else f"finished (rc {proc.returncode})"))
        if proc.returncode != -signal.SIGKILL:
            shutil.rmtree(swept)
            expected_start = 0
            continue
        expected_start = max(before, default=0)
    log = os.path.join(args.out, "final.log")
    rc = start(args, swept, log).wait()
    started = resumed_from(log)
    final_ok = rc == 0 and started == expected_start
    resumes_ok += started == expected_start
    resumes_seen += 1
    saved = sorted(committed_steps(swept))
    equal = [s for s in saved
             if bit_equal(f"{swept}/checkpoints/{s}", f"{ref}/checkpoints/{s}")]
    lost = {s for s in range(args.every, args.steps + 1, args.every)} - set(saved)
    print(f"SIGKILLs: {kills} (runs that finished before their kill: {finished_early})")
    print(f"resumes that started from the newest committed checkpoint: "
          f"{resumes_ok}/{resumes_seen} (runs killed before they logged where they started "
          f"from: {attempt + 1 - resumes_seen})")
    print(f"final run: rc {rc}, resumed from step {started}")
    print(f"checkpoints bit-equal to the uninterrupted run's: {len(equal)}/{len(saved)} "
          f"(final step {args.steps}: {'yes' if args.steps in equal else 'NO'})")
    print(f"checkpoints lost: {len(lost)} {sorted(lost)}")
    return 0 if final_ok and not lost and len(equal) == len(saved) else 1


if __name__ == "__main__":
    sys.exit(main())
