"""Regenerates the README's attention pictures under colabs/figures/ (no download).

    python colabs/make_figures.py              # geometry only, seconds
    python colabs/make_figures.py --learned    # also runs attention_explained.ipynb (minutes)

Geometry: what SASA's 7x7 window keeps at a border pixel of a 56x56 map (the first
attention stage of a 224 input), and Twins' 7x7 LSA windows beside GSA's sub-sampled keys
(sr = 8) on the same map, drawn over scikit-image's astronaut photograph.

``--learned`` executes colabs/attention_explained.ipynb with its full settings (tiny models
of each family trained on digits, needs nbclient and ipykernel) and copies its learned
Twins LSA/GSA picture and the attention distance per layer next to them.
"""

import os
import shutil
import sys
import tempfile

from skimage import data, transform

from hybrid_attn import viz

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "figures")
LEARNED = {"twins_lsa_gsa.png": "learned_twins_lsa_gsa.png",
           "attention_distance.png": "learned_attention_distance.png"}


def geometry() -> None:
    image = transform.resize(data.astronaut(), (224, 224), anti_aliasing=True)
    fig = viz.plot_local_window(image, (56, 56), (0, 20), 7,
                                title="SASA 7x7 window at a border query (56x56 map)")
    print(viz.save(fig, os.path.join(OUT, "local_window.png"), dpi=70))
    fig = viz.plot_lsa_gsa(image, (56, 56), (10, 30), 7, (7, 7), (8, 8),
                           title="Twins-SVT stage 1: LSA windows and GSA keys")
    print(viz.save(fig, os.path.join(OUT, "lsa_gsa.png"), dpi=70))


def learned() -> None:
    import nbclient
    import nbformat

    with tempfile.TemporaryDirectory() as tmp:
        env = {"HYBRID_ATTN_NOTEBOOK_OUT": tmp, "HYBRID_ATTN_NOTEBOOK_SMALL": "0"}
        os.environ.update(env)
        notebook = nbformat.read(os.path.join(HERE, "attention_explained.ipynb"), as_version=4)
        nbclient.NotebookClient(notebook, kernel_name="python3", timeout=3600,
                                resources={"metadata": {"path": os.path.dirname(HERE)}}
                                ).execute()
        for source, target in LEARNED.items():
            print(shutil.copyfile(os.path.join(tmp, source), os.path.join(OUT, target)))


if __name__ == "__main__":
    geometry()
    if "--learned" in sys.argv[1:]:
        learned()
