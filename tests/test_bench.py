"""The benchmark CLI's measurements on CPU: small sizes, checks fields, not speed."""

import json
import subprocess
import sys

import pytest

from hybrid_attn import bench


def test_model_benchmark_reports_xla_flops_and_throughput():
    r = bench.run_benchmark("resnet26", res=32, batch=8, mode="infer", steps=1, warmup=0,
                            num_classes=10)
    assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
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
