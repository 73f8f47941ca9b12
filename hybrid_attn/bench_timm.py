"""The timm side of ``python -m hybrid_attn.bench --against timm``; prints one JSON line per run.

Run as a script by a python that has torch and timm (it imports nothing from this
project, so the project never needs torch)::

    /path/to/timm-venv/bin/python hybrid_attn/bench_timm.py --model coatnet_0_224 \\
        --res 224 --batch 8 --mode train --threads 1 --steps 3 --warmup 1

The protocol is the one ``bench.py`` uses for our models: random NHWC-sized images
(NCHW here), ``--warmup`` untimed steps, then the median of ``--steps`` timed steps. A train
step is forward + softmax cross-entropy + backward + AdamW update (lr 1e-3, weight decay
0.05); inference is a forward pass in eval mode under ``torch.inference_mode``. Each
configuration is run eagerly and, unless ``--no-compile``, with ``torch.compile`` of the
model (its compile time is the first call's time minus an eager step). ``--threads N``
pins the process to N CPUs and calls ``torch.set_num_threads(N)``. ``--serve`` keeps the
built runs and times steps on request, so that ``bench.py --rounds`` can alternate the two
sides (:func:`serve`). Under ``bench.py`` it
inherits that process's environment, ``GLIBC_TUNABLES`` (``hybrid_attn/host_malloc.py``'s
tunables) included, so both sides run with the same malloc settings. Besides wall time per
step, the process CPU time per step is reported: on a shared machine it is the steadier
measure of work at one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def limit_threads(threads: int | None) -> None:
    """Pins this process to its first ``threads`` allowed CPUs (before any pool starts)."""
    if threads:
        allowed = sorted(os.sched_getaffinity(0))
        if threads > len(allowed):
            raise SystemExit(f"--threads={threads} but only {len(allowed)} CPUs are allowed")
        os.sched_setaffinity(0, allowed[:threads])


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(step, steps: int) -> dict:
    """Wall and CPU seconds of each of ``steps`` calls (also ``bench.py``'s timing loop:
    this file imports nothing that needs torch at module level)."""
    walls, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), cpu_seconds()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return {"walls": walls, "cpus": cpus}


def time_steps(step, steps: int, warmup: int) -> tuple[float, float, float]:
    """(first call s, median wall s, median CPU s) per step after ``warmup`` calls."""
    first = timed(step, 1)["walls"][0]
    timed(step, warmup)
    t = timed(step, steps)
    return first, statistics.median(t["walls"]), statistics.median(t["cpus"])


def build(model_name: str, res: int, batch: int, mode: str, compile_model: bool,
          num_classes: int = 1000):
    """(step, description) for one timm model, eager or under ``torch.compile``."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=num_classes, pretrained=False)
    images = torch.randn(batch, 3, res, res)
    labels = torch.arange(batch) % num_classes
    fn = torch.compile(model) if compile_model else model
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(fn(images), labels)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                fn(images)

    info = {
        "timm_model": model_name, "compiled": compile_model,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "timm": timm.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    return step, info


def run(model_name: str, res: int, batch: int, mode: str, steps: int, warmup: int,
        compile_model: bool, num_classes: int = 1000) -> dict:
    """Times one timm model eagerly or compiled; returns the measurements."""
    step, info = build(model_name, res, batch, mode, compile_model, num_classes)
    first, wall, cpu = time_steps(step, steps, warmup)
    return {
        **info,
        "img_per_s": round(batch / wall, 3), "step_ms": round(wall * 1e3, 1),
        "cpu_ms": round(cpu * 1e3, 1),
        "compile_s": round(max(first - wall, 0.0), 2) if compile_model else None,
    }


def serve(args: argparse.Namespace, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The rounds protocol of ``bench.py --rounds``: builds each run, calls it once and
    ``--warmup`` times, prints ``{"ready": [info, ...]}`` (compile time included), then
    answers each stdin line ``{"compiled": bool, "steps": N}`` with one line
    ``{"walls": [...], "cpus": [...]}`` (seconds per step) until stdin closes. Between
    requests the process waits on stdin and uses no CPU, so the two sides take turns."""
    runs, infos = {}, []
    for compiled in (False,) if args.no_compile else (False, True):
        step, info = build(args.model, args.res, args.batch, args.mode, compiled,
                           args.num_classes)
        first = timed(step, 1)["walls"][0]
        warm = timed(step, max(args.warmup, 1))["walls"]
        info["compile_s"] = round(max(first - warm[-1], 0.0), 2) if compiled else None
        runs[compiled] = step
        infos.append(info)
    print(json.dumps({"ready": infos}), file=stdout, flush=True)
    for line in stdin:
        request = json.loads(line)
        print(json.dumps(timed(runs[bool(request["compiled"])], int(request["steps"]))),
              file=stdout, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    p.add_argument("--serve", action="store_true",
                   help="answer timing requests on stdin (bench.py --rounds; see serve())")
    args = p.parse_args()
    limit_threads(args.threads)
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_timm needs torch and timm in this python") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve:
        serve(args)
        return
    for compiled in (False,) if args.no_compile else (False, True):
        print(json.dumps(run(args.model, args.res, args.batch, args.mode, args.steps,
                             args.warmup, compiled, args.num_classes)), flush=True)


if __name__ == "__main__":
    main()
