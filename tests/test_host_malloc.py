"""host_malloc: with its glibc settings a repeated XLA:CPU computation stops page-faulting
its output buffer; without them every call faults it in again."""

import json
import subprocess
import sys

import pytest

from hybrid_attn import host_malloc

pytestmark = pytest.mark.skipif(host_malloc._glibc() is None, reason="needs glibc")

# A 64 MiB result (16,384 pages of 4 KiB), computed nine times; prints the minor page
# faults of the last call. (With the settings the heap first grows by a few such blocks,
# since an aligned block freed next to small ones is too small for the next aligned
# request, then reuses them: measured 4 calls with faults, then none.)
_PROBE = """
import json, resource, sys
import jax, jax.numpy as jnp
from hybrid_attn import host_malloc
applied = host_malloc.keep_freed_memory() if sys.argv[1] == "keep" else False
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(8):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
_PAGES = 4096 * 4096 * 4 // 4096


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                          text=True, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kept_memory_is_not_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    # glibc's default maps the 64 MiB result afresh on every call...
    assert default["faults"] > _PAGES // 2, default
    # ...and with the settings the freed block is reused without faulting its pages.
    assert kept["applied"] is True
    assert kept["faults"] < _PAGES // 20, kept


def test_entry_point_setup_follows_platform_and_opt_out(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("HYBRID_ATTN_MALLOC", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_only() and host_malloc.setup_for_entry_point() and calls == [1]
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_malloc.cpu_only() and not host_malloc.setup_for_entry_point()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HYBRID_ATTN_MALLOC", "default")
    assert not host_malloc.setup_for_entry_point() and calls == [1]
