"""The XLA compiler options this project compiles with on CPU (train step, state init,
evaluation, prediction and the benchmark); GPU and TPU get XLA's defaults.

* :data:`CPU_LIGHT_CODEGEN` (``light_codegen``, train step and init only): LLVM at -O1
  without its expensive passes. The init is dominated by the random initialisers, one
  large threefry kernel per parameter shape, where LLVM's -O2 pipeline is what costs; it
  runs once, and the parameters come out bitwise equal. On a 2-core AMD EPYC VM (224x224,
  float32; README, Benchmark) the bench's init_s went from 20.3 / 16.4 to 15.3 / 14.7 s
  for CoAtNet-0, 24.2 / 26.0 to 17.1 / 13.6 s for Twins-SVT-S and 14.8 / 15.8 to 9.2 /
  12.3 s for ResNet-50 (two runs each). The train step's heavy kernels are library calls,
  so its speed does not depend on LLVM's level: in one process, compiled both ways and
  called alternately (batch 8, one thread, a 2-core Xeon VM, 2026-12-07), Twins-SVT-S took
  a median 1873 ms per step at -O1 against 1858 ms at -O2, CoAtNet-0 3767 against 3842 ms.
  Its compile gets shorter for Twins-SVT-S (18.7 -> 16.4 s there; with the scan path at
  two threads 12.6 -> 10.0 and 11.4 -> 9.4 s) and stays the same for CoAtNet-0.
* :data:`CPU_LIBRARY_FUSIONS` (always, on CPU): matrix products and reductions go to
  YNNPACK as in XLA's default, but dense convolutions stay on XLA's own (Eigen)
  convolution. XLA:CPU's default also hands each convolution to YNNPACK, which on the
  2-core Xeon VM (AVX-512, batch 8, float32, jax 0.10.2) did not use the second thread for
  some of ResNet's shapes: a 3x3 convolution on 56x56x64 took 11.9 ms forward and 12.1 ms
  for its input gradient at two threads (12.5 / 12.7 at one), Eigen's 7.2 / 6.9 ms; on
  112x112 from 32 channels 24.8 / 26.1 against 13.4 / 15.6 ms. Whole programs, compiled
  both ways in one process and called alternately (2026-12-08, two threads / one):
  ResNet-50 inference 307 -> 282 / 544 -> 537 ms, its train step 1143 -> 1062 / 2057 ->
  2005 ms, CoAtNet-0 inference 441 -> 431 / 763 -> 768 ms and train step 1761 -> 1712 ms
  at two threads; Twins-SVT-S has no dense convolution outside products and compiles to
  the same program.

A key that ``XLA_FLAGS`` sets wins (the tests compile at -O0), and an option this jaxlib
does not know is left out (:func:`supported`) rather than failing every compile.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from absl import logging

CPU_LIGHT_CODEGEN = {"xla_backend_optimization_level": 1,
                     "xla_llvm_disable_expensive_passes": True}
CPU_LIBRARY_FUSIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _compiles_with(items: tuple[tuple[str, Any], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1, backend="cpu", compiler_options=dict(items)).lower(
            jax.ShapeDtypeStruct((), "float32")).compile()
    except Exception as e:  # noqa: BLE001  XLA raises JaxRuntimeError (INVALID_ARGUMENT)
        logging.warning("XLA:CPU rejects compiler options %s, compiling without them: %s",
                        dict(items), e)
        return False
    return True


def supported(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` if this jaxlib's XLA:CPU compiles with them, else ``{}`` (logged once)."""
    return options if _compiles_with(tuple(sorted(options.items()))) else {}


def compiler_options(platform: str, light_codegen: bool = False) -> dict[str, Any] | None:
    """``jax.jit`` compiler options for a program on ``platform`` (``"cpu"``, ``"gpu"``,
    ``"tpu"``): on CPU :data:`CPU_LIBRARY_FUSIONS` (where supported) and, with
    ``light_codegen``, :data:`CPU_LIGHT_CODEGEN`, less any key ``XLA_FLAGS`` sets; None
    (XLA's defaults) elsewhere or when nothing is left."""
    if platform != "cpu":
        return None
    set_keys = {f.split("=", 1)[0].lstrip("-") for f in os.environ.get("XLA_FLAGS", "").split()}
    unset = lambda options: {k: v for k, v in options.items() if k not in set_keys}  # noqa: E731
    library = unset(CPU_LIBRARY_FUSIONS)
    options = {**(supported(library) if library else {}),
               **(unset(CPU_LIGHT_CODEGEN) if light_codegen else {})}
    return options or None
