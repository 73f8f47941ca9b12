"""XLA:CPU compiler options (hybrid_attn/xla_cpu.py): what they change in the compiled
program, that results do not change, and how they step aside."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hybrid_attn import xla_cpu

_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_then_product(x, k, w):
    y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=_DIMS)
    return y.reshape(-1, y.shape[-1]) @ w


def _entry(hlo: str) -> str:
    return hlo[hlo.index("\nENTRY"):]


def _ynn_bodies(hlo: str) -> str:
    """The text of every computation that a YNNPACK fusion calls."""
    called = re.findall(r"fusion\(.*?calls=%?([\w.\-]+).*__ynn_fusion", hlo)
    return "\n".join(re.search(rf"\n%?{re.escape(c)} .*?\n}}", hlo, re.S).group(0)
                     for c in called)


def test_convolutions_leave_ynnpack_and_products_stay():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 32, 48)) * 0.1, jnp.float32)
    w = jnp.asarray(rng.normal(size=(48, 64)), jnp.float32)
    options = xla_cpu.compiler_options("cpu")
    assert options == xla_cpu.CPU_LIBRARY_FUSIONS  # the key is not in conftest's XLA_FLAGS
    ours = jax.jit(_conv_then_product, compiler_options=options).lower(x, k, w).compile()
    default = jax.jit(_conv_then_product).lower(x, k, w).compile()
    hlo, hlo_default = ours.as_text(), default.as_text()
    # XLA's default hands both to YNNPACK (the control: the check below can fail) ...
    assert "convolution(" in _ynn_bodies(hlo_default) and " dot(" in _ynn_bodies(hlo_default)
    # ... ours keeps the product there and runs the convolution as XLA's own instruction.
    assert "convolution(" not in _ynn_bodies(hlo) and " dot(" in _ynn_bodies(hlo)
    assert re.search(r"= f32\[2,12,12,48\]\{[\d,]+\} convolution\(", _entry(hlo))
    # Both compute the convolution, against a brute-force loop in float64.
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + 12, j:j + 12], np.asarray(k)[i, j])
              for i in range(3) for j in range(3))
    ref = ref.reshape(-1, 48) @ np.asarray(w, np.float64)
    for compiled in (ours, default):
        np.testing.assert_allclose(compiled(x, k, w), ref, rtol=1e-4, atol=1e-3)


def test_xla_flags_win_and_other_backends_get_defaults(monkeypatch):
    assert xla_cpu.compiler_options("gpu") is None
    assert xla_cpu.compiler_options("tpu", light_codegen=True) is None
    key = next(iter(xla_cpu.CPU_LIBRARY_FUSIONS))
    monkeypatch.setenv("XLA_FLAGS", f"--{key}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert xla_cpu.compiler_options("cpu") is None
    assert xla_cpu.compiler_options("cpu", light_codegen=True) == xla_cpu.CPU_LIGHT_CODEGEN


def test_an_option_this_xla_does_not_know_is_left_out(monkeypatch):
    monkeypatch.setattr(xla_cpu, "CPU_LIBRARY_FUSIONS", {"xla_no_such_option": True})
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_cpu.supported({"xla_no_such_option": True}) == {}
    assert xla_cpu.compiler_options("cpu") is None
    assert xla_cpu.compiler_options("cpu", light_codegen=True) == xla_cpu.CPU_LIGHT_CODEGEN
    # A known option passes the same probe.
    assert xla_cpu.supported({"xla_llvm_disable_expensive_passes": True}) == {
        "xla_llvm_disable_expensive_passes": True}
