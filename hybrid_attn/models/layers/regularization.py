"""Stochastic depth (drop path), shared by every family that uses residual blocks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
    """Drops the whole residual branch per example with probability ``rate`` (Huang et al.

    2016), rescaling kept examples by ``1 / (1 - rate)``. Identity at eval time. Uses the
    ``dropout`` rng stream.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def drop_path_rates(rate: float, depths: list[int] | tuple[int, ...]) -> list[list[float]]:
    """Per-block drop-path rates rising linearly from 0 to ``rate`` over all blocks."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out
