"""Tensor layout helpers shared by the per-family timm converters."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# Buffers, not weights: recomputed by the model (index tables) or meaningless to it.
IGNORED_SUFFIXES = ("num_batches_tracked", "relative_position_index")


class TrackedStateDict(Mapping):
    """A read-only view of a state dict that records which tensors were read.

    Converters read through it and finish with :meth:`check_all_used`, so a checkpoint
    with tensors the mapping does not know is rejected by name instead of half-loaded.
    Membership tests (``key in sd``) do not count as a use. Keys ending in one of
    ``ignore`` (buffers, not weights) are hidden.
    """

    def __init__(self, state_dict: Mapping, ignore: tuple[str, ...] = IGNORED_SUFFIXES):
        self._sd = {k: v for k, v in state_dict.items() if not k.endswith(ignore)}
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = self._sd[key]
        self.used.add(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._sd

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def check_all_used(self, target: str) -> None:
        """Raises ValueError naming the tensors no mapping onto ``target`` consumed."""
        unused = sorted(set(self._sd) - self.used)
        if unused:
            raise ValueError(f"State dict tensors with no place in {target} ({len(unused)}):"
                             + "".join(f"\n  {name}" for name in unused))


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor or array-like as a numpy array of its own dtype (no torch import)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def conv_kernel(w) -> np.ndarray:
    """PyTorch conv weight [out, in/groups, kh, kw] -> flax [kh, kw, in/groups, out]."""
    return np.transpose(to_numpy(w), (2, 3, 1, 0))


def dense_kernel(w) -> np.ndarray:
    """PyTorch linear weight [out, in] (or a 1x1 conv [out, in, 1, 1]) -> flax [in, out]."""
    w = to_numpy(w)
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return w.T


def batch_norm(sd: Mapping, prefix: str) -> tuple[dict, dict]:
    """A PyTorch BatchNorm's tensors -> (params, batch_stats) for ``flax.linen.BatchNorm``."""
    params = {"scale": to_numpy(sd[f"{prefix}.weight"]), "bias": to_numpy(sd[f"{prefix}.bias"])}
    stats = {"mean": to_numpy(sd[f"{prefix}.running_mean"]),
             "var": to_numpy(sd[f"{prefix}.running_var"])}
    return params, stats


def layer_norm(sd: Mapping, prefix: str) -> dict:
    """A PyTorch LayerNorm's tensors -> params for ``flax.linen.LayerNorm``."""
    return {"scale": to_numpy(sd[f"{prefix}.weight"]), "bias": to_numpy(sd[f"{prefix}.bias"])}


def dense(sd: Mapping, prefix: str) -> dict:
    """A PyTorch Linear (or 1x1 conv) -> params for ``flax.linen.Dense``."""
    out = {"kernel": dense_kernel(sd[f"{prefix}.weight"])}
    if f"{prefix}.bias" in sd:
        out["bias"] = to_numpy(sd[f"{prefix}.bias"])
    return out


def conv(sd: Mapping, prefix: str) -> dict:
    """A PyTorch Conv2d -> params for ``flax.linen.Conv``."""
    out = {"kernel": conv_kernel(sd[f"{prefix}.weight"])}
    if f"{prefix}.bias" in sd:
        out["bias"] = to_numpy(sd[f"{prefix}.bias"])
    return out


def check_shapes(converted: Mapping, reference: Mapping, path: str = "") -> None:
    """Raises ValueError naming every leaf whose shape differs from ``reference`` or is
    missing/extra, so a wrong mapping fails at load time rather than deep inside XLA."""
    problems: list[str] = []

    def walk(a, b, p):
        if isinstance(b, Mapping):
            if not isinstance(a, Mapping):
                problems.append(f"{p}: expected a subtree, got {type(a).__name__}")
                return
            for key in sorted(set(a) | set(b)):
                if key not in a:
                    problems.append(f"{p}/{key}: missing from converted weights")
                elif key not in b:
                    problems.append(f"{p}/{key}: not a variable of the model")
                else:
                    walk(a[key], b[key], f"{p}/{key}")
        elif tuple(np.shape(a)) != tuple(b.shape):
            problems.append(f"{p}: expected shape {tuple(b.shape)}, got {tuple(np.shape(a))}")

    walk(converted, reference, path)
    if problems:
        raise ValueError("Converted weights do not fit the model:\n  " + "\n  ".join(problems))
