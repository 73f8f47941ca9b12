"""The house BatchNorm, shared by every convolutional family (ResNet, BoTNet, SASA, MBConv).

PyTorch's defaults (its momentum 0.1 is flax's 0.9, eps 1e-5) so that imported running
statistics mean the same thing here, and float32 statistics whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

Dtype = Any


def batch_norm(
    train: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    scale_init: nn.initializers.Initializer = nn.initializers.ones,
    epsilon: float = 1e-5,
) -> nn.BatchNorm:
    """A BatchNorm named ``name``: batch statistics when ``train``, running ones otherwise.

    ``scale_init=zeros`` starts a residual branch's last BatchNorm at zero (Goyal et al.
    2017), so a fresh block is the identity. ``epsilon``: PyTorch's default unless the
    published model sets another (timm's BatchNorm transformer blocks use 1e-6).
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=epsilon,
        force_float32_reductions=True, scale_init=scale_init, dtype=dtype,
        param_dtype=param_dtype, name=name,
    )
