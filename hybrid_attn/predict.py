"""Top-5 ImageNet classes of images from an imported checkpoint::

    python -m hybrid_attn.predict --checkpoint runs/resnet50_a1 cat.jpg dog.png

``--checkpoint`` is a workdir written by ``python -m hybrid_attn.convert`` (its newest
step) or a ``<workdir>/checkpoints/<step>`` directory. Images are prepared exactly as timm
evaluates the imported weights, with the preprocessing the checkpoint records: the shorter
side resized (PIL, the recorded interpolation) to ``floor(size / crop_pct)``, a central
``size`` x ``size`` crop, scaled to [0, 1] and normalised with the recorded mean and std.
Class names: ``imagenet_classes.txt`` beside this file (WordNet id and lemmas, in the
class order of tfds' ``imagenet2012`` labels, from timm's ``imagenet_synset_to_lemma``).
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

CLASS_NAMES_FILE = pathlib.Path(__file__).with_name("imagenet_classes.txt")
_INTERPOLATION = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
                  "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING,
                  "lanczos": Image.LANCZOS}


def preprocess(image: Image.Image, prep: Mapping[str, Any]) -> np.ndarray:
    """timm's centre-crop evaluation transform of one image -> float32 [size, size, 3].

    ``prep`` holds ``input_size`` (C, H, W; square), ``crop_pct``, ``crop_mode``
    (``center``), ``interpolation``, ``mean`` and ``std``, as the checkpoint records them.
    """
    _, height, width = prep["input_size"]
    if height != width or prep.get("crop_mode", "center") != "center":
        raise ValueError(f"Only square inputs with a centre crop are supported, got "
                         f"input_size {tuple(prep['input_size'])}, crop_mode "
                         f"{prep.get('crop_mode')!r}")
    if prep["interpolation"] not in _INTERPOLATION:
        raise ValueError(f"Unknown interpolation {prep['interpolation']!r}; expected one of "
                         f"{', '.join(_INTERPOLATION)}")
    image = image.convert("RGB")
    w, h = image.size
    short = math.floor(height / prep["crop_pct"])
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize((new_w, new_h), _INTERPOLATION[prep["interpolation"]])
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names (first lemma of each WordNet id), in label order."""
    lines = CLASS_NAMES_FILE.read_text().splitlines()
    return tuple(line.split("\t", 1)[1].split(",")[0] for line in lines)


def checkpoint_step_dir(path: str) -> str:
    """``path`` itself if it is a ``.../checkpoints/<step>`` directory, else the newest step
    under ``path/checkpoints``."""
    from hybrid_attn import checkpoint

    resolved = checkpoint.resolve(path.rstrip("/"))
    if resolved.name.isdigit():
        return str(resolved)
    steps = [int(p.name) for p in (resolved / "checkpoints").glob("*") if p.name.isdigit()] \
        if (resolved / "checkpoints").exists() else []
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {resolved}: expected <workdir>/checkpoints/"
                                "<step>, as python -m hybrid_attn.convert writes")
    return str(resolved / "checkpoints" / str(max(steps)))


class Predictor:
    """An imported checkpoint ready to classify images with its recorded preprocessing."""

    def __init__(self, path: str):
        import jax

        from hybrid_attn import checkpoint
        from hybrid_attn.convert.pretrained import model_from_meta
        from hybrid_attn.evaluate import eval_variables

        step_dir = checkpoint_step_dir(path)
        loaded = checkpoint.load_variables(step_dir)
        self.meta = loaded["meta"]
        if "preprocessing" not in self.meta or "num_classes" not in self.meta:
            raise ValueError(f"{step_dir} records no preprocessing: predict reads checkpoints "
                             "written by python -m hybrid_attn.convert")
        self.preprocessing = self.meta["preprocessing"]
        self.model = model_from_meta(self.meta)
        self.variables = eval_variables(loaded["params"], loaded["batch_stats"], loaded["ema"])
        from hybrid_attn.xla_cpu import compiler_options

        self._apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False),
                              compiler_options=compiler_options(jax.default_backend()))

    def logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 logits ``[len(images), num_classes]``."""
        x = np.stack([preprocess(image, self.preprocessing) for image in images])
        return np.asarray(self._apply(self.variables, x))

    def top_k(self, images: Sequence[Image.Image], k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable classes as (name, probability); names are
        ImageNet's for 1000-class models, else ``class <index>``."""
        logits = self.logits(images)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        names = imagenet_class_names() if logits.shape[-1] == 1000 else None
        return [[(names[i] if names else f"class {i}", float(p[i]))
                 for i in np.argsort(-p, kind="stable")[:k]] for p in probs]


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the top-5 classes of each image; bad input ends with one line, exit code 2."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hybrid_attn.predict",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="workdir or checkpoints/<step>")
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    args = parser.parse_args(argv)
    try:
        predictor = Predictor(args.checkpoint)
        images = [_open_image(p) for p in args.images]
        results = predictor.top_k(images)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"{predictor.meta.get('import_name', predictor.meta['model_name'])} "
          f"({predictor.meta.get('timm_name', '')})")
    for path, top in zip(args.images, results):
        print(path)
        for name, p in top:
            print(f"  {p:7.2%}  {name}")


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"No image file at {path}") from None
    except OSError as e:
        raise ValueError(f"{path} is not an image PIL can read ({e})") from None


if __name__ == "__main__":
    main()
