"""Reading weight files into ``{name: numpy array}``: ``.safetensors`` with numpy alone,
PyTorch ``.pth`` / ``.pt`` / ``.bin`` pickles only when torch is installed.

Every failure is a one-sentence error naming the file and what was expected, so the CLI
can print it as is.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

SAFETENSORS = (".safetensors",)
TORCH_PICKLES = (".pth", ".pt", ".bin")
# Checkpoints that wrap the state dict, as training scripts save them.
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")


class MissingTorchError(ImportError):
    """A PyTorch pickle was given but torch is not installed."""


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of the weight file at ``path`` as numpy arrays (bfloat16 read as float32).

    Raises:
      FileNotFoundError: no file at ``path``.
      MissingTorchError: a ``.pth``/``.pt``/``.bin`` file without torch installed.
      ValueError: an unknown extension, or a file that is not a readable checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        return _read_safetensors(path)
    if suffix in TORCH_PICKLES:
        return _read_torch(path)
    raise ValueError(f"{path} is neither {' nor '.join(SAFETENSORS)} nor a PyTorch "
                     f"checkpoint ({', '.join(TORCH_PICKLES)})")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({_first_line(e)})") \
            from None


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise MissingTorchError(f"Reading {path} needs torch (pip install torch), or use the "
                                "weights' .safetensors file, which needs only numpy") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle and zip errors have no common base
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") \
            from None
    for key in _WRAPPERS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of tensor names to tensors)")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
            for k, v in loaded.items()}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
