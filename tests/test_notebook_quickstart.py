"""colabs/quickstart.ipynb runs top to bottom with its small settings (see notebook_runner)."""

import pytest
from notebook_runner import run_notebook

pytest.importorskip("nbclient")


@pytest.mark.slow
def test_quickstart_runs_and_draws(tmp_path, monkeypatch):
    run_notebook("quickstart.ipynb", tmp_path, monkeypatch)
