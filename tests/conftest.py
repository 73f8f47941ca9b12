"""Test-wide setup: 8 fake CPU devices (set before jax is imported) so multi-device code is
exercised on CPU, and TF kept off any accelerator."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
