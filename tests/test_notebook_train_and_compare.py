"""colabs/train_and_compare.ipynb runs top to bottom with its small settings (see
notebook_runner). It turns on ``eval_attention_images`` for its CoAtNet run only, so its
event files show the TensorBoard switch writes image summaries only when on."""

import glob
import os

import pytest
from notebook_runner import run_notebook

pytest.importorskip("nbclient")


def _image_tags(workdir: str) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    return {tag for tag in acc.Tags().get("tensors", [])
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == "images"}


@pytest.mark.slow
def test_train_and_compare_runs_draws_and_writes_attention_images_only_when_on(
        tmp_path, monkeypatch):
    out = run_notebook("train_and_compare.ipynb", tmp_path, monkeypatch)
    runs = sorted(glob.glob(str(out / "runs" / "*")))
    tags = {os.path.basename(r): _image_tags(r) for r in runs}
    assert tags.pop("CoAtNet") == {"eval_attention"}  # eval_attention_images=4
    assert tags and all(not t for t in tags.values())  # off by default
