"""Every notebook under colabs/ runs top to bottom with its small settings
(``HYBRID_ATTN_NOTEBOOK_SMALL=1``: a few training steps, fast-compiling XLA) in a fresh
python3 kernel, and draws the pictures it promises as valid PNG files.

The notebooks' pictures are computed by ``hybrid_attn.viz``, whose numbers are checked
against brute force in ``tests/test_viz.py``; here only that the notebooks run and write
them. ``train_and_compare`` also turns on ``eval_attention_images`` for one of its runs, so
its event files show the TensorBoard switch writes image summaries only when on.

Cost: the four tiny trainings of attention_explained dominate (compiles, not steps). Measured
on the shared 2-core machine under load 10-14: 548 s wall, 244 s CPU for the three notebooks
(``/usr/bin/time pytest -q tests/test_notebooks.py``); the kernels' own CPU time was 100 s
(attention_explained) + 30 s (quickstart) + 38 s (train_and_compare).
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")

# The PNG files each notebook must write into $HYBRID_ATTN_NOTEBOOK_OUT.
EXPECTED = {
    "quickstart.ipynb": [],
    "attention_explained.ipynb": [
        "botnet_query.png", "botnet_relative_logits.png", "sasa_border_window.png",
        "sasa_query.png", "twins_lsa_gsa.png", "coatnet_bias_tables.png", "coatnet_query.png",
        "attention_distance.png",
    ],
    "train_and_compare.ipynb": [
        "curves.png", "confusion.png", "misclassified.png",
    ],
}


def test_every_notebook_is_listed():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, "*.ipynb"))) == \
        sorted(EXPECTED)


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """One TFDS data dir (digits is built once, in a second) and one JAX compilation cache
    for the notebooks of this run: they train the same tiny models, so a model compiled by
    one notebook is not compiled again by the next (the cache starts empty every run)."""
    return str(tmp_path_factory.mktemp("tfds")), str(tmp_path_factory.mktemp("jax_cache"))


def _image_tags(workdir: str) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    return {tag for tag in acc.Tags().get("tensors", [])
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == "images"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_draws(name, tmp_path, shared_dirs, monkeypatch):
    from PIL import Image

    out = tmp_path / "out"
    data_dir, cache_dir = shared_dirs
    # The kernel inherits this environment: small settings, a private output folder, and
    # one CPU device (conftest's 8 fake devices would only slow the notebooks down).
    monkeypatch.setenv("HYBRID_ATTN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HYBRID_ATTN_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("HYBRID_ATTN_CHECKPOINT", raising=False)
    notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError, naming the cell, on any cell error
    for png in EXPECTED[name]:
        path = out / png
        assert path.exists(), f"{name} did not write {png}"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 50
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0, f"{png} is blank"
    if name == "train_and_compare.ipynb":
        runs = sorted(glob.glob(str(out / "runs" / "*")))
        tags = {os.path.basename(r): _image_tags(r) for r in runs}
        assert tags.pop("CoAtNet") == {"eval_attention"}  # eval_attention_images=4
        assert tags and all(not t for t in tags.values())  # off by default
