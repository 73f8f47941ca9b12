"""Every notebook under colabs/ is executed by the suite: each has its PNG list in
``notebook_runner.EXPECTED`` and a ``tests/test_notebook_<name>.py`` that runs it (one file
per notebook, so the two xdist workers share them).

Cost, measured in two full ``pytest -q`` runs (2 workers, 2-core machine, at a453b71 and 292c3bc):
attention_explained 89-92 s (its four tiny trainings: compiles, not steps),
train_and_compare 59-60 s, quickstart 40-50 s.
"""

import glob
import os

from notebook_runner import COLABS, EXPECTED

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_every_notebook_is_listed_and_has_a_test_file():
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, "*.ipynb")))
    assert names == sorted(EXPECTED)
    for name in names:
        test_file = os.path.join(TESTS, f"test_notebook_{name.removesuffix('.ipynb')}.py")
        assert os.path.exists(test_file), f"{name} has no {os.path.basename(test_file)}"
