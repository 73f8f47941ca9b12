"""The benchmark CLI's measurements on CPU: small sizes, checks fields, not speed."""

import json
import os
import subprocess
import sys

import pytest

from hybrid_attn import bench, launch_local, xla_cpu


def test_model_benchmark_reports_xla_flops_and_throughput():
    r = bench.run_benchmark("resnet26", res=32, batch=8, mode="infer", steps=1, warmup=0,
                            num_classes=10)
    assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
    assert 0 < r["lower_s"] < r["compile_s"] and r["init_s"] > 0
    # Inference compiles with the library choice alone (the -O1 codegen is the train step's).
    assert r["compiler_options"] == xla_cpu.CPU_LIBRARY_FUSIONS
    # Summed over the 8 test devices. XLA counts a multiply-add as 2 FLOPs: ResNet-26 is
    # 2.35 GMACs at 224 (SASA Table 1: 4.7 GFLOPs), so (32/224)^2 of it is ~48 MMACs.
    assert 0.05e9 < r["flops_per_step"] / 8 < 0.15e9
    assert r["params"] == pytest.approx(13.70e6 - 2048 * 990, rel=0.01)  # 10-class head


def test_layer_benchmark_local_attention_vs_conv():
    kw = dict(feature_map="16x12x32", batch=2, mode="train", steps=1, warmup=0)
    attn = bench.run_layer_benchmark("local_attention", **kw)
    conv = bench.run_layer_benchmark("conv3x3", **kw)
    assert attn["map"] == [16, 12, 32] and attn["map_bytes"] == 2 * 16 * 12 * 32 * 4
    assert attn["temp_memory_bytes"] > conv["temp_memory_bytes"] > 0
    with pytest.raises(ValueError, match="--map must look like 56x56x64"):
        bench.run_layer_benchmark("conv3x3", "56x56", batch=1, mode="infer")


def test_cli_prints_one_json_line():
    out = subprocess.run(
        [sys.executable, "-m", "hybrid_attn.bench", "--layer=conv3x3", "--map=8x8x4",
         "--batch=1", "--mode=infer", "--steps=1", "--warmup=0"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["layer"] == "conv3x3"


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    # One CPU device: conftest's fast-compile flags without its 8-device count.
    env = {**os.environ,
           "XLA_FLAGS": launch_local.with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1)}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "hybrid_attn.bench", *args],
                          capture_output=True, text=True, timeout=300, env=env)


TINY = ("--model=resnet26", "--res=32", "--batch=1", "--mode=infer", "--steps=1",
        "--warmup=0", "--num_classes=10")


def test_cli_uses_jax_compilation_cache_when_set(tmp_path):
    """The README's recipe for restarts: JAX_COMPILATION_CACHE_DIR reaches the restarted
    process (host_malloc re-executes it), is reported, and receives the executables."""
    cache = tmp_path / "xla_cache"
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    done = _cli(*TINY, env_extra=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["compilation_cache"] == str(cache)
    assert any(p.name.startswith("jit_") for p in cache.iterdir())
    assert json.loads(_cli(*TINY).stdout)["compilation_cache"] is None


def test_cli_against_timm_without_timm_is_one_line():
    done = _cli(*TINY, "--against=timm", "--timm_model=resnet26",
                "--timm_python=/nonexistent/python")
    assert done.returncode != 0 and not done.stdout
    assert "Traceback" not in done.stderr
    # TensorFlow's C++ logging may print start-up lines first; ours is the one error line.
    assert done.stderr.strip().splitlines()[-1] == (
        "--against timm: /nonexistent/python cannot import timm and torch; pass "
        "--timm_python (or set HYBRID_ATTN_TIMM_PYTHON) to a python that can")


def test_rounds_alternate_sides_abba_and_ratios_are_medians_over_rounds():
    order = []

    class FakeTimm:
        runs = [{"compiled": False}, {"compiled": True}]

        def time(self, compiled, steps):
            order.append("compiled" if compiled else "eager")
            return [3.0] * steps, [6.0] * steps

    def ours():
        order.append("ours")

    ours_times, timm_runs = bench.run_rounds(ours, FakeTimm(), rounds=4, steps=2, warmup=1)
    # An untimed round of one step each (reverse order: it counts as round -1), then ABBA.
    assert order[:3] == ["compiled", "eager", "ours"]
    assert order[3:] == ["ours", "ours", "eager", "compiled", "compiled", "eager", "ours", "ours",
                     "ours", "ours", "eager", "compiled", "compiled", "eager", "ours", "ours"]
    assert len(ours_times[0]) == 4 and all(len(r) == 2 for r in ours_times[0])
    assert set(timm_runs) == {"timm_eager", "timm_compiled"}
    # Per round, ours took 1, 2, 1 and 4 s (median of its steps) against timm's 3 s: the
    # rounds' ratios are 3, 1.5, 3 and 0.75 and the reported one is their median, 2.25;
    # the speeds are medians over all steps.
    walls = [[1.0, 1.0], [2.0, 2.0], [1.0, 1.0], [4.0, 4.0]]
    r = bench.compare({"batch": 6}, (walls, walls), {"timm_eager": (
        {"compiled": False}, ([[3.0, 3.0]] * 4, [[3.0, 3.0]] * 4))})
    assert r["round_ratios_vs_timm_eager"] == [3.0, 1.5, 3.0, 0.75]
    assert r["ratio_vs_timm_eager"] == r["cpu_ratio_vs_timm_eager"] == 2.25
    assert r["img_per_s"] == 4.0 and r["timm_eager"]["img_per_s"] == 2.0 and r["rounds"] == 4


def test_timm_side_serve_protocol(monkeypatch):
    """bench_timm.py --serve, with timm's model replaced by a counter: warms each run up
    once plus --warmup, then times exactly the steps asked for, one JSON line per request."""
    import argparse
    import io

    from hybrid_attn import bench_timm

    calls = {False: 0, True: 0}

    def build(model, res, batch, mode, compiled, num_classes):
        def step():
            calls[compiled] += 1
        return step, {"timm_model": model, "compiled": compiled}

    monkeypatch.setattr(bench_timm, "build", build)
    args = argparse.Namespace(model="m", res=8, batch=1, mode="train", warmup=2,
                              num_classes=10, no_compile=False)
    out = io.StringIO()
    bench_timm.serve(args, io.StringIO('{"compiled": true, "steps": 4}\n'
                                       '{"compiled": false, "steps": 1}\n'), out)
    ready, first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert [run["compiled"] for run in ready["ready"]] == [False, True]
    assert len(first["walls"]) == len(first["cpus"]) == 4 and len(second["walls"]) == 1
    assert calls == {False: 1 + 2 + 1, True: 1 + 2 + 4}


def test_cli_rounds_need_against():
    done = _cli(*TINY, "--rounds=2")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "--rounds must be 1, or more with --against timm; got 2")


def test_cli_against_timm_has_no_counterpart_for_sasa():
    done = _cli("--model=sasa_resnet26", "--against=timm")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "--against timm: no timm counterpart for 'sasa_resnet26'")


# A stand-in for the timm venv's python: passes the import check and speaks
# bench_timm.py's --serve protocol, a batch-1 eager step taking 0.5 s (2 img/s, 50 ms CPU)
# and a compiled one 0.25 s; it logs its argv and each request to $FAKE_LOG.
FAKE_TIMM = """\
import json, os, sys
if sys.argv[1] == "-c":
    sys.exit(0)
log = open(os.environ["FAKE_LOG"], "a")
log.write(json.dumps(sys.argv[1:]) + "\\n")
runs = [{"timm_model": "resnet26", "compiled": c, "compile_s": None} for c in (False, True)]
print("a torch warning on stdout")
print(json.dumps({"ready": runs}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    log.write(line)
    wall, cpu = (0.25, 0.025) if request["compiled"] else (0.5, 0.05)
    n = request["steps"]
    print(json.dumps({"walls": [wall] * n, "cpus": [cpu] * n}), flush=True)
"""


def test_cli_joins_timm_side_and_pins_threads(tmp_path):
    fake, log = tmp_path / "python", tmp_path / "log"
    fake.write_text(f"#!{sys.executable}\n{FAKE_TIMM}")
    fake.chmod(0o755)
    done = _cli(*TINY, "--threads=1", "--remat=block", "--against=timm", "--rounds=3",
                "--timm_model=resnet26", env_extra={"HYBRID_ATTN_TIMM_PYTHON": str(fake),
                                                    "FAKE_LOG": str(log)})
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip())
    assert r["cpus"] == 1 and r["img_per_s"] > 0 and r["cpu_ms"] > 0 and r["rounds"] == 3
    assert r["timm_eager"]["img_per_s"] == 2.0 and r["timm_eager"]["cpu_ms"] == 50.0
    assert r["timm_compiled"]["img_per_s"] == 4.0 and r["timm_compiled"]["step_ms"] == 250.0
    # One step per round each side (TINY's --steps=1): each round's ratio is timm's step
    # time over ours in that round, and the reported ratio is their median.
    eager = r["round_ratios_vs_timm_eager"]
    assert len(eager) == 3 and r["ratio_vs_timm_eager"] == sorted(eager)[1]
    assert r["ratio_vs_timm_eager"] == pytest.approx(r["img_per_s"] / 2.0, rel=0.5)
    assert r["ratio_vs_timm_compiled"] == pytest.approx(r["ratio_vs_timm_eager"] / 2, rel=1e-2)
    assert r["cpu_ratio_vs_timm_eager"] == pytest.approx(50.0 / r["cpu_ms"], rel=0.5)
    argv, *requests = log.read_text().splitlines()
    assert "--serve" in argv and '"--threads", "1"' in argv
    # ABBA: eager, compiled; then compiled, eager; then eager, compiled (TINY's
    # --warmup=0: no untimed round).
    assert [json.loads(q)["compiled"] for q in requests] == [False, True, True, False,
                                                              False, True]
    assert r["timm_same_architecture"] is None  # an explicit --timm_model is not vouched for
    # The switch is passed to a model with a `remat` field and noted as unsupported otherwise.
    assert r["remat"] in ("block", "unsupported by resnet26")
    row = [line for line in done.stderr.splitlines() if line.startswith("| resnet26 |")]
    assert len(row) == 1 and f"| {r['img_per_s']:.2f} | 2.00 | " in row[0]
