"""Regenerates the README's attention pictures under colabs/figures/ (no model, no download).

    python colabs/make_figures.py

Geometry only: what SASA's 7x7 window keeps at a border pixel of a 56x56 map (the first
attention stage of a 224 input), and Twins' 7x7 LSA windows beside GSA's sub-sampled keys
(sr = 8) on the same map, drawn over scikit-image's astronaut photograph.
"""

import os

from skimage import data, transform

from hybrid_attn import viz

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def main() -> None:
    image = transform.resize(data.astronaut(), (224, 224), anti_aliasing=True)
    fig = viz.plot_local_window(image, (56, 56), (0, 20), 7,
                                title="SASA 7x7 window at a border query (56x56 map)")
    print(viz.save(fig, os.path.join(OUT, "local_window.png"), dpi=70))
    fig = viz.plot_lsa_gsa(image, (56, 56), (10, 30), 7, (7, 7), (8, 8),
                           title="Twins-SVT stage 1: LSA windows and GSA keys")
    print(viz.save(fig, os.path.join(OUT, "lsa_gsa.png"), dpi=70))


if __name__ == "__main__":
    main()
