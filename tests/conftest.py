"""Test-wide setup: 8 fake CPU devices (set before jax is imported) so multi-device code is
exercised on CPU, and TF kept off any accelerator."""

import os

# Fast-compiling XLA:CPU: tiny test models are dominated by compile time. No LLVM
# optimisation halves it; the classic elemental emitters instead of the MLIR fusion
# emitters cut it by another third (one scan-equivalence test: 20.1 s -> 13.2 s, jax 0.10).
# Results agree with the optimised build to float rounding, and speed is measured by
# `python -m hybrid_attn.bench`, never here.
os.environ.setdefault("XLA_FLAGS", " ".join([
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# The longest files first (seconds per file in full `pytest -q` runs at a453b71 and 292c3bc,
# 2 workers, 2-core machine: multiprocess 143-156, attention_explained 89-92, speed_paths 68-76,
# scan_paths 60-70, train_and_compare 59-60, bench 55, train 48, finetune 34-44,
# quickstart 40-50). pyproject runs xdist with --dist loadfile --no-loadscope-reorder,
# which hands files to the workers in collection order; longest first lets the two finish
# together (xdist's default order, most tests first, left the longest files to the end).
LONGEST_FIRST = (
    "test_multiprocess.py", "test_notebook_attention_explained.py", "test_speed_paths.py",
    "test_scan_paths.py", "test_notebook_train_and_compare.py", "test_bench.py",
    "test_train.py", "test_finetune.py", "test_notebook_quickstart.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: rest in order


# Shared reference helpers (import as ``from conftest import softmax, count_scalars``).
def softmax(logits):
    """Numerically stable softmax over the last axis, in numpy (brute-force references)."""
    import numpy as np

    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def count_scalars(tree) -> int:
    """Number of scalars in a tree of arrays or ``jax.ShapeDtypeStruct`` s."""
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_module(name: str):
    """``configs/<name>.py`` loaded by path, as ``--config=`` loads it."""
    import importlib.util

    path = os.path.join(CONFIG_DIR, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str, arg: str = ""):
    """``--config=configs/<name>.py:<arg>`` as a ConfigDict (import as ``from conftest
    import load_config``)."""
    return config_module(name).get_config(arg)
