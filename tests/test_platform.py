"""layers/platform.py: the per-backend form is chosen at trace time (only the CPU form is
traced on this CPU-only machine), and all_platforms() restores lax.platform_dependent."""

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_attn.models.layers import platform
from hybrid_attn.models.layers.conv import depthwise_conv


def _primitives(jaxpr) -> set[str]:
    """Every primitive's name in ``jaxpr`` and its sub-jaxprs (cond branches included)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names |= _primitives(sub)
    return names


def test_cpu_form_alone_is_traced_on_cpu():
    assert jax.default_backend() == "cpu"
    traced = []

    def cpu(x):
        traced.append("cpu")
        return jnp.sin(x)

    def default(x):
        traced.append("default")
        return jnp.cos(x)

    def f(x):
        return platform.platform_dependent(x, cpu=cpu, default=default)

    def g(x):  # a fresh function: jit and make_jaxpr reuse f's trace (all_platforms' note)
        return platform.platform_dependent(x, cpu=cpu, default=default)

    x = jnp.arange(4.0)
    jaxpr = jax.make_jaxpr(f)(x)
    assert traced == ["cpu"]
    assert "platform_index" not in _primitives(jaxpr.jaxpr)
    np.testing.assert_array_equal(jax.jit(f)(x), jnp.sin(x))

    traced.clear()
    with platform.all_platforms():
        jaxpr = jax.make_jaxpr(g)(x)
        # Both forms traced into a switch on the lowering platform; the CPU lowering runs
        # the cpu form.
        assert sorted(traced) == ["cpu", "default"]
        assert {"platform_index", "cond"} <= _primitives(jaxpr.jaxpr)
        np.testing.assert_array_equal(jax.jit(g)(x), jnp.sin(x))
    traced.clear()
    jax.make_jaxpr(lambda x: g(x))(x)  # the context is left: one form again
    assert traced == ["cpu"]


def test_depthwise_conv_traces_only_its_cpu_form():
    """The fast path that motivated the module: outside all_platforms() its jaxpr has no
    grouped convolution (the native form is not traced); inside it has both, and both
    programs give the same values."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 8))
    f = lambda x, k: depthwise_conv(x, k)  # noqa: E731
    g = lambda x, k: depthwise_conv(x, k)  # noqa: E731  (fresh: f's trace is cached)
    assert "conv_general_dilated" not in _primitives(jax.make_jaxpr(f)(x, k).jaxpr)
    with platform.all_platforms():
        both = jax.make_jaxpr(g)(x, k)
        assert {"conv_general_dilated", "platform_index"} <= _primitives(both.jaxpr)
        switched = jax.jit(g)(x, k)
    native = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=8,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(jax.jit(f)(x, k), native, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(switched, native, rtol=1e-5, atol=1e-5)
