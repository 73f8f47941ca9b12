"""Preemption sweep: SIGKILL a training run at random moments, restart it each time, and
check that nothing is lost and the result is bit-identical to an uninterrupted run.

    python launch/sigkill_sweep.py --kills=20 --steps=300 --out=/tmp/sweep

1. An uninterrupted reference run saves a checkpoint every ``--every`` steps (all kept).
2. The swept run is started in its own workdir and killed with SIGKILL after a uniform
   random delay in [0, the wall time of a whole run] (so kills land in imports,
   compilation, steps and async saves), then restarted, ``--kills`` times, and finally
   run to completion. A run that ends before its kill starts over in a fresh workdir
   (and, when it ran from scratch, its time becomes the whole-run time: the reference
   ran with a cold compilation cache).
3. Reported: resumes that worked (the restart after each kill started from the newest
   checkpoint committed when the killed process died, judged by the first restart that
   logs where it started), final states bit-equal to the reference's (of every run that
   went to the end, whether before a kill or last; every checkpoint of it is compared
   with the reference's of the same step), and checkpoints lost (committed before a
   kill and missing or moved aside as unreadable afterwards, or never written).
   The exit code is 0 only for N/N resumes, all checkpoints equal and none lost.

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
           "JAX_COMPILATION_CACHE_DIR": args.out.rstrip("/") + "_jax_cache",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    with open(log, "wb") as f:
        return subprocess.Popen(command(args, workdir), env=env, stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO)


def uncommitted(workdir: str) -> set[str]:
    """Temporary (uncommitted) save directories on disk."""
    directory = os.path.join(workdir, "checkpoints")
    return {n for n in os.listdir(directory) if not n.isdigit()} if os.path.isdir(
        directory) else set()


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


def compare(args: argparse.Namespace, swept: str, ref: str) -> tuple[int, int, bool]:
    """A run that went to the end against the reference: how many of its checkpoints are
    bit-equal to the reference's of the same step, how many it has, and whether the
    final one is."""
    saved = sorted(committed_steps(swept))
    equal = {s for s in saved if bit_equal(f"{swept}/checkpoints/{s}", f"{ref}/checkpoints/{s}")}
    return len(equal), len(saved), args.steps in equal


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
          f"checkpoints {sorted(committed_steps(ref))[:3]}...{max(committed_steps(ref))}",
          flush=True)

    full_run = ref_time  # the wall time of a whole run, as last measured
    kills = finished_early = attempt = kills_mid_save = kills_before_start = 0
    runs: list[tuple[int, int, bool]] = []  # per run to the end: equal, saved, final equal
    expected_start = 0  # the newest step committed when the last process died
    pending = 0  # kills whose restart has not yet logged where it started from
    resumes_ok = resumes_checked = 0
    lost: set[int] = set()  # committed before a kill, gone after the restart
    committed_at_kill: set[int] = set()

    def check_start(log: str) -> int | None:
        nonlocal pending, resumes_ok, resumes_checked
        started = resumed_from(log)
        if started is not None:
            ok = started == expected_start
            resumes_checked += pending
            resumes_ok += pending if ok else 0
            pending = 0
            lost.update(committed_at_kill - committed_steps(swept))
        return started

    while kills < args.kills:
        log = os.path.join(args.out, f"run{attempt:02d}.log")
        attempt += 1
        t_run, leftovers = time.monotonic(), uncommitted(swept)
        proc = start(args, swept, log)
        delay = rng.uniform(0, full_run)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        started = check_start(log)
        if proc.returncode == 0 and started == 0:  # a whole run with a warm compile cache
            full_run = min(full_run, time.monotonic() - t_run)
        ok = started is None or started == expected_start
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            pending += 1
            committed_at_kill = committed_steps(swept)  # final: the process is dead
            expected_start = max(committed_at_kill, default=0)
            mid_save = bool(uncommitted(swept) - leftovers)  # this run's save, cut short
            kills_mid_save += mid_save
            kills_before_start += started is None
            outcome = (f"killed after {delay:.1f}s with step {expected_start} committed"
                       + (", a save in flight" if mid_save else "")
                       + (", before it logged its start" if started is None else ""))
        else:
            finished_early += 1  # ran to the end before its kill: check it, start over
            runs.append(compare(args, swept, ref))
            shutil.rmtree(swept, ignore_errors=True)
            expected_start, committed_at_kill = 0, set()
            outcome = f"finished before its kill (rc {proc.returncode}); starting over"
        print(f"run {attempt:2d}: started from step {started} "
              f"({'ok' if ok else 'WRONG'}); {outcome}", flush=True)
    log = os.path.join(args.out, "final.log")
    rc = start(args, swept, log).wait()
    started = check_start(log)
    runs.append(compare(args, swept, ref))
    lost |= set(range(args.every, args.steps + 1, args.every)) - committed_steps(swept)
    final_equal = sum(final for _, _, final in runs)
    equal, saved = sum(e for e, _, _ in runs), sum(n for _, n, _ in runs)
    print(f"SIGKILLs: {kills} ({kills_before_start} before the run logged its start, i.e. "
          f"in imports, state creation or restore; {kills_mid_save} with a save in flight); runs "
          f"that finished before their kill: {finished_early}")
    print(f"final run: rc {rc}, started from step {started} (expected {expected_start})")
    report = (f"resumes that worked: {resumes_ok}/{resumes_checked}; final states bit-equal "
              f"to the uninterrupted run: {final_equal}/{len(runs)} runs to the end "
              f"({equal}/{saved} of their checkpoints); checkpoints lost: "
              f"{len(lost)}{' ' + str(sorted(lost)) if lost else ''}")
    print(report)
    return 0 if (rc == 0 and resumes_ok == resumes_checked == kills and not lost
                 and final_equal == len(runs) and equal == saved) else 1


if __name__ == "__main__":
    sys.exit(main())
