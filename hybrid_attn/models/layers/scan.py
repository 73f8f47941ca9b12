"""Speed switches over the blocks of a stage: per-block rematerialisation and ``nn.scan``.

``remat="block"`` wraps each block in ``nn.remat`` (activations inside a block are
recomputed in the backward pass instead of stored); the parameter tree is unchanged.
``scan_blocks=True`` keeps a stage's first block (it changes shape or stride) unrolled as
``block0`` and runs blocks ``1 .. n-1`` (identical shapes) through one ``nn.scan`` named
``blocks``, whose variables are those of one block under ``blocks/block`` with a leading
axis of length ``n - 1``; XLA then compiles one block body instead of ``n - 1``.
:func:`stack_blocks` / :func:`unstack_blocks` move a stage's variables between the two
layouts so a checkpoint works with either. A stage whose blocks repeat with a period
(Twins-SVT: LSA, GSA, LSA, ...) scans over groups: ``stack_blocks(..., start=2, period=2,
members=("local", "global"))`` puts block ``2 + 2g`` under ``blocks/block/local`` and
``3 + 2g`` under ``blocks/block/global`` at index ``g``. :func:`same_factory` compares block
factories (``functools.partial`` compares by identity) to decide whether blocks are equal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BlockFactory = Callable[..., nn.Module]
REMAT = ("none", "block")
SCANNED = "blocks"
# Collections a block may create or sow; each gets the scan's leading block axis.
_AXES = {"params": 0, "batch_stats": 0, "attention": 0, "intermediates": 0}


def check_remat(remat: str) -> None:
    """One-line error for an unknown ``remat`` policy."""
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")


def remat_block(factory: BlockFactory, remat: str) -> BlockFactory:
    """``factory`` (a block class or a ``functools.partial`` of one) with its class wrapped
    in ``nn.remat`` when ``remat == "block"``; same arguments and parameter names."""
    check_remat(remat)
    if remat == "none":
        return factory
    if isinstance(factory, functools.partial):
        return functools.partial(remat_block(factory.func, remat), *factory.args,
                                 **factory.keywords)
    return _remat_class(factory)


@functools.cache
def _remat_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` under ``nn.remat`` with its keyword-only ``train`` kept static (a lifted
    remat traces keyword arguments, and ``train`` picks Python branches)."""

    class Positional(cls):
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            return super().__call__(x, train=train)

    rematted = nn.remat(Positional, static_argnums=(2,))

    class Remat(rematted):
        def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
            return super().__call__(x, train)

    Remat.__name__ = Remat.__qualname__ = f"Remat{cls.__name__}"
    return Remat


class _Repeat(nn.Module):
    """The scan body: one block ``block`` applied to the carry."""

    make: BlockFactory
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return self.make(name="block")(x, train=self.train), None


def scanned_blocks(make: BlockFactory, length: int, *, train: bool, remat: str,
                   name: str = SCANNED) -> Callable[[jax.Array], jax.Array]:
    """``length`` identical blocks built by ``make(name=...)`` run by one ``nn.scan``
    (each body rematerialised when ``remat == "block"``); returns ``x -> y``."""
    check_remat(remat)
    body = nn.remat(_Repeat) if remat == "block" else _Repeat
    if length == 1:
        # One block: the same variables (leading axis of 1), without a loop. nn.scan would
        # trace its body twice and compile a one-trip loop around it (Twins-SVT-S's stage
        # 4 and CoAtNet-0's stages 1 and 4); Twins-SVT-S's scan-path train step lowered and
        # compiled in 10.6-11.6 s this way against 11.7-12.3 s (README, Benchmark).
        single = nn.map_variables(
            body, mapped_collections=tuple(_AXES), mutable=True,
            trans_in_fn=lambda v: jax.tree.map(lambda a: a[0], v),
            trans_out_fn=lambda v: jax.tree.map(lambda a: a[None], v))(make, train, name=name)
        return lambda x: single(x, None)[0]
    scan = nn.scan(body, variable_axes=_AXES, split_rngs={"params": True, "dropout": True},
                   length=length)(make, train, name=name)
    return lambda x: scan(x, None)[0]


def same_rate(rates: Sequence[float], where: str) -> float:
    """The one drop-path rate shared by the scanned blocks (a scan body is one module, so
    its rate is one number); a clear error when they differ."""
    if len(set(rates)) > 1:
        raise ValueError(f"{where}: scan_blocks needs one drop-path rate for the scanned "
                         f"blocks, got {tuple(rates)}; use drop_path_rate=0 or scan_blocks=False")
    return rates[0]


def same_factory(a: Any, b: Any) -> bool:
    """Whether two block/spatial factories build the same module: ``functools.partial``
    objects compare by identity, so partials are compared by func, args and keywords."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (same_factory(a.func, b.func) and len(a.args) == len(b.args)
                and all(same_factory(u, v) for u, v in zip(a.args, b.args))
                and a.keywords.keys() == b.keywords.keys()
                and all(same_factory(a.keywords[k], b.keywords[k]) for k in a.keywords))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- e.g. arrays: ambiguous truth value
        return a is b


def stack_blocks(stage: Mapping[str, Any], depth: int, prefix: str = "block", *,
                 start: int = 1, period: int = 1,
                 members: Sequence[str] | None = None) -> dict:
    """A stage's variables (one collection) from the unrolled layout (``block0`` ..
    ``block{depth-1}``) to the scanned one: blocks ``start ..`` stacked under
    ``blocks/block``. With ``period > 1`` the scan body is a group of ``period`` blocks
    whose submodules are ``members`` (block ``start + g*period + j`` -> ``blocks/block/
    members[j]`` at index ``g``); blocks after the last whole group stay unrolled."""
    groups = (depth - start) // period if depth > start else 0
    if groups <= 0:
        return dict(stage)
    if period > 1 and (members is None or len(members) != period):
        raise ValueError(f"stack_blocks: period={period} needs {period} member names, "
                         f"got {members!r}")
    names = [[f"{prefix}{start + g * period + j}" for j in range(period)]
             for g in range(groups)]
    missing = [n for row in names for n in row if n not in stage]
    if missing:
        raise ValueError(f"stack_blocks: stage has no {missing}; keys are {sorted(stage)}")
    flat = {n for row in names for n in row}
    out = {k: v for k, v in stage.items() if k not in flat}

    def stack(col: int) -> Any:
        return jax.tree.map(lambda *a: jnp.stack(a), *[stage[row[col]] for row in names])

    out[SCANNED] = {"block": stack(0) if period == 1 else
                    {m: stack(j) for j, m in enumerate(members)}}
    return out


def unstack_blocks(stage: Mapping[str, Any], prefix: str = "block", *, start: int = 1,
                   members: Sequence[str] | None = None) -> dict:
    """The inverse of :func:`stack_blocks` (same ``start`` and ``members``): ``blocks/block``
    split back into ``block{start}`` ...."""
    if SCANNED not in stage:
        raise ValueError(f"unstack_blocks: stage has no {SCANNED!r}; keys are {sorted(stage)}")
    stacked = stage[SCANNED]["block"]
    cols = [stacked] if members is None else [stacked[m] for m in members]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in stage.items() if k != SCANNED}
    for g in range(n):
        for j, col in enumerate(cols):
            out[f"{prefix}{start + g * len(cols) + j}"] = jax.tree.map(
                lambda a, g=g: a[g], col)
    return out
