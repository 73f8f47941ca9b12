"""Runs a notebook of colabs/ top to bottom with its small settings and checks the PNGs it
promises; used by the ``tests/test_notebook_<name>.py`` files (one file per notebook, so
pytest-xdist's ``--dist loadfile`` can run the notebooks on different workers).

Small settings (``HYBRID_ATTN_NOTEBOOK_SMALL=1``): a few training steps, fast-compiling
XLA, in a fresh python3 kernel. The notebooks' pictures are computed by
``hybrid_attn.viz``, whose numbers are checked against brute force in
``tests/test_viz.py``; here only that the notebooks run and write them.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

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


def run_notebook(name: str, tmp_path: pathlib.Path, monkeypatch) -> pathlib.Path:
    """Executes colabs/<name> in a fresh kernel (nbclient raises CellExecutionError, naming
    the cell, on any cell error), asserts every PNG of ``EXPECTED[name]`` exists, is a PNG
    and is not blank, and returns the notebook's output folder."""
    import nbclient
    import nbformat
    from PIL import Image

    out = tmp_path / "out"
    # The kernel inherits this environment: small settings, a private output folder, and
    # one CPU device (conftest's 8 fake devices would only slow the notebooks down).
    monkeypatch.setenv("HYBRID_ATTN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HYBRID_ATTN_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("HYBRID_ATTN_CHECKPOINT", raising=False)
    notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()
    for png in EXPECTED[name]:
        path = out / png
        assert path.exists(), f"{name} did not write {png}"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 50
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0, f"{png} is blank"
    return out
