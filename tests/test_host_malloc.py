"""host_malloc: with its glibc tunables and inline dispatch a repeated XLA:CPU computation
reuses its buffers instead of faulting them in afresh; entry points restart with them."""

import json
import os
import subprocess
import sys

import pytest

from hybrid_attn import host_malloc

linux_thp = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and host_malloc.transparent_hugepages()),
    reason="needs Linux with transparent huge pages (always or madvise)")

# A 64 MiB result (16,384 pages of 4 KiB), computed nine times; prints the minor page
# faults of the last call; `{setup}` runs first, before jax is imported.
_PROBE = """
import json, resource
{setup}
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(8):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
_PAGES = 4096 * 4096 * 4 // 4096


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "HYBRID_ATTN_MALLOC")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _run(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _faults(setup: str = "", **env: str) -> int:
    return json.loads(_run(_PROBE.replace("{setup}", setup), _env(**env)))["faults"]


_CONFIGURE = "from hybrid_attn import host_malloc; host_malloc.configure_process()"


@linux_thp
def test_the_tunables_and_inline_dispatch_stop_the_faults_of_a_large_result():
    # glibc maps the 64 MiB result afresh on every call and faults in each 4 KiB page...
    default = _faults()
    assert default > _PAGES // 2, default
    # ...with huge pages alone in 2 MiB pages (32 for 64 MiB, plus small blocks)...
    huge = _faults(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert huge < _PAGES // 20, huge
    # ...and an entry point (restarted with all the tunables, dispatching inline) reuses
    # the previous call's memory: no fault.
    kept = _faults(_CONFIGURE)
    assert kept < 8, kept
    # HYBRID_ATTN_MALLOC=default opts out.
    assert _faults(_CONFIGURE, HYBRID_ATTN_MALLOC="default") > _PAGES // 2


_SHOW = ("from hybrid_attn import host_malloc; host_malloc.configure_process(); "
         "import os, sys; from jax._src import xla_bridge; "
         "print(repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:], "
         "xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)")


@linux_thp
def test_entry_point_restarts_with_the_tunables_unless_opted_out():
    out = _run(_SHOW, _env(GLIBC_TUNABLES="glibc.malloc.tcache_count=8:glibc.malloc.mmap_max=4"))
    tunables = ":".join(("glibc.malloc.tcache_count=8", *host_malloc.TUNABLES))
    assert out == f"'{tunables}' [] False", out
    assert _run(_SHOW, _env(HYBRID_ATTN_MALLOC="default")) == "None [] True"
    assert _run(_SHOW, _env(JAX_PLATFORMS="cuda,cpu")) == "None [] True"


def test_platform_and_kernel_detection(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not host_malloc.cpu_only()
    for mode, expected in (("always [madvise] never", True), ("[always] madvise never", True),
                           ("always madvise [never]", False)):
        (tmp_path / "enabled").write_text(mode + "\n")
        assert host_malloc.transparent_hugepages(tmp_path / "enabled") is expected
    assert not host_malloc.transparent_hugepages(tmp_path / "missing")
    assert host_malloc.with_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {
        "GLIBC_TUNABLES": ":".join(host_malloc.TUNABLES)}
