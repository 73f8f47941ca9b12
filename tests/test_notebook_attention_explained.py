"""colabs/attention_explained.ipynb runs top to bottom with its small settings (see
notebook_runner)."""

import pytest
from notebook_runner import run_notebook

pytest.importorskip("nbclient")


@pytest.mark.slow
def test_attention_explained_runs_and_draws(tmp_path, monkeypatch):
    run_notebook("attention_explained.ipynb", tmp_path, monkeypatch)
