"""The benchmark CLI's measurements on CPU: small sizes, checks fields, not speed."""

import json
import os
import subprocess
import sys

import pytest

from hybrid_attn import bench, launch_local


def test_model_benchmark_reports_xla_flops_and_throughput():
    r = bench.run_benchmark("resnet26", res=32, batch=8, mode="infer", steps=1, warmup=0,
                            num_classes=10)
    assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
    assert 0 < r["lower_s"] < r["compile_s"] and r["init_s"] > 0
    assert r["compiler_options"] is None  # conftest's XLA_FLAGS set both keys: they win
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


def test_cli_against_timm_has_no_counterpart_for_sasa():
    done = _cli("--model=sasa_resnet26", "--against=timm")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "--against timm: no timm counterpart for 'sasa_resnet26'")


def test_cli_joins_timm_side_and_pins_threads(tmp_path):
    # A stand-in for the timm venv's python: passes the import check, prints two runs.
    fake = tmp_path / "python"
    eager = {"timm_model": "resnet26", "compiled": False, "img_per_s": 2.0, "cpu_ms": 50.0}
    compiled = dict(eager, compiled=True, img_per_s=4.0, cpu_ms=25.0)
    fake.write_text("#!/bin/sh\n[ \"$1\" = -c ] && exit 0\n"
                    f"echo '{json.dumps(eager)}'\necho '{json.dumps(compiled)}'\n")
    fake.chmod(0o755)
    done = _cli(*TINY, "--threads=1", "--remat=block", "--against=timm",
                "--timm_model=resnet26", env_extra={"HYBRID_ATTN_TIMM_PYTHON": str(fake)})
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip())
    assert r["cpus"] == 1 and r["img_per_s"] > 0 and r["cpu_ms"] > 0
    assert r["timm_eager"] == eager and r["timm_compiled"] == compiled
    assert r["ratio_vs_timm_eager"] == pytest.approx(r["img_per_s"] / 2.0, rel=1e-2)
    assert r["ratio_vs_timm_compiled"] == pytest.approx(r["img_per_s"] / 4.0, rel=1e-2)
    assert r["cpu_ratio_vs_timm_eager"] == pytest.approx(50.0 / r["cpu_ms"], rel=1e-2)
    assert r["timm_same_architecture"] is None  # an explicit --timm_model is not vouched for
    # The switch is passed to a model with a `remat` field and noted as unsupported otherwise.
    assert r["remat"] in ("block", "unsupported by resnet26")
    row = [line for line in done.stderr.splitlines() if line.startswith("| resnet26 |")]
    assert len(row) == 1 and f"| {r['img_per_s']:.2f} | 2.00 | " in row[0]
