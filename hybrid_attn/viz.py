"""Pictures of attention: what each variant looks at, drawn over the input image.

Two layers: **geometry and statistics** (plain numpy, unit-tested against brute force in
``tests/test_viz.py``) and **plots** (matplotlib, imported only when a plot is drawn, so
the library works without it). Everything takes plain arrays plus geometry, as returned by
:func:`hybrid_attn.models.capture.attention_maps`: weights ``[heads, Hq, Wq, Hk, Wk]`` of
one image, the query map ``(Hq, Wq)``, the key grid ``(Hk, Wk)`` and the key stride (how many
query-map cells one key covers; ``(r, r)`` for Twins' sub-sampled keys).

Coordinates are ``(row, col)`` cells of the layer's query map unless a name says pixels.
A query map of ``Hq`` rows over an image of ``H`` pixels has ``H / Hq`` pixels per cell.

``colabs/attention_explained.ipynb`` draws every picture here for each attention family,
``colabs/train_and_compare.ipynb`` the curves, confusion matrix and image grids, and
``hybrid_attn.evaluate.attention_images`` the TensorBoard summaries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------
# Geometry and statistics (numpy only).


def query_maps(weights: np.ndarray, query: Sequence[int]) -> np.ndarray:
    """``[heads, Hk, Wk]``: every head's weights of one ``query = (row, col)``, from one
    image's ``[heads, Hq, Wq, Hk, Wk]`` weights."""
    weights = np.asarray(weights)
    if weights.ndim != 5:
        raise ValueError(f"expected one image's [heads, Hq, Wq, Hk, Wk] weights, got shape "
                         f"{weights.shape}")
    i, j = query
    hq, wq = weights.shape[1:3]
    if not (0 <= i < hq and 0 <= j < wq):
        raise ValueError(f"query {tuple(query)} is outside the {hq}x{wq} query map")
    return weights[:, i, j]


def window_support(map_hw: Sequence[int], query: Sequence[int], kernel: int) -> np.ndarray:
    """Boolean ``[H, W]``: the ``kernel x kernel`` neighbourhood of ``query`` clipped at the
    map border -- the keys a SASA-style local window attends to (the rest is masked)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd size, got {kernel}")
    h, w = map_hw
    r = kernel // 2
    i, j = query
    out = np.zeros((h, w), bool)
    out[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1] = True
    return out


def lsa_window(map_hw: Sequence[int], query: Sequence[int], window: int) -> np.ndarray:
    """Boolean ``[H, W]``: the non-overlapping ``window x window`` cell (Twins' LSA) that
    holds ``query``, clipped at the border (padded positions are masked keys)."""
    h, w = map_hw
    i0, j0 = (query[0] // window) * window, (query[1] // window) * window
    out = np.zeros((h, w), bool)
    out[i0:i0 + window, j0:j0 + window] = True
    return out


def key_cells(key_hw: Sequence[int], key_stride: Sequence[int]) -> np.ndarray:
    """``[Hk, Wk, 4]`` boxes ``(row0, col0, row1, col1)`` (end exclusive, query-map cells)
    of the image region each key summarises: key ``(a, b)`` covers rows ``a*sh .. (a+1)*sh``
    (Twins' GSA: a kernel = stride = sr conv, so an ``H x W`` map gives ``(H//sr) x (W//sr)``
    keys)."""
    (hk, wk), (sh, sw) = key_hw, key_stride
    a, b = np.meshgrid(np.arange(hk), np.arange(wk), indexing="ij")
    return np.stack([a * sh, b * sw, (a + 1) * sh, (b + 1) * sw], axis=-1)


def attention_distance(
    weights: np.ndarray, key_stride: Sequence[int] = (1, 1), pixels_per_cell: float = 1.0
) -> np.ndarray:
    """``[heads]`` mean attention distance (Dosovitskiy et al. 2021, Fig. 7): for every
    query, the attention-weighted mean Euclidean distance to the keys' centres, averaged
    over queries (and images when ``weights`` has a leading batch axis).

    ``weights`` is ``[..., heads, Hq, Wq, Hk, Wk]``; query ``(i, j)`` sits at cell centre
    ``(i + 1/2, j + 1/2)`` and key ``(a, b)`` at the centre of its box of
    :func:`key_cells`. Distances are in cells times ``pixels_per_cell`` (image pixels per
    query-map cell). Rows are normalised first, so weights that lost a share to non-image
    keys (timm's zero-padded halo) still average correctly.
    """
    weights = np.asarray(weights, np.float64)
    *lead, heads, hq, wq, hk, wk = weights.shape
    weights = weights.reshape(-1, heads, hq, wq, hk, wk)
    qy, qx = np.meshgrid(np.arange(hq) + 0.5, np.arange(wq) + 0.5, indexing="ij")
    boxes = key_cells((hk, wk), key_stride)
    ky, kx = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    dist = np.hypot(qy[:, :, None, None] - ky, qx[:, :, None, None] - kx)  # [hq, wq, hk, wk]
    total = weights.sum(axis=(-2, -1))
    mean = (weights * dist).sum(axis=(-2, -1)) / np.where(total > 0, total, 1.0)
    return mean.mean(axis=(0, 2, 3)) * pixels_per_cell


def bias_offset_images(table: np.ndarray) -> np.ndarray:
    """CoAtNet's ``[2H-1, 2W-1, heads]`` bias table as ``[heads, 2H-1, 2W-1]`` images indexed
    by the key's offset from the query, ``(dy, dx) = key - query``, at ``(dy + H-1, dx +
    W-1)``: the table stores ``w[query - key]`` (Eq. 3), so it is flipped on both axes."""
    table = np.asarray(table)
    if table.ndim != 3:
        raise ValueError(f"expected a [2H-1, 2W-1, heads] table, got shape {table.shape}")
    return np.moveaxis(table[::-1, ::-1], -1, 0)


def relative_logit_profile(rel_height: np.ndarray, rel_width: np.ndarray,
                           queries: np.ndarray) -> np.ndarray:
    """BoTNet's relative logits seen by one query vector per head, ``[heads, 2H-1, 2W-1]``
    indexed by ``key - query`` offset like :func:`bias_offset_images`:
    ``q . r_h[dy] + q . r_w[dx]`` with ``rel_height [2H-1, d]``, ``rel_width [2W-1, d]``
    (row ``H-1`` is offset 0) and ``queries [heads, d]`` (already scaled as the layer
    scales them). With the heads' mean query it is the position preference of a typical
    query, the content-independent picture of what the tables learned."""
    rel_height, rel_width, queries = map(np.asarray, (rel_height, rel_width, queries))
    rows = np.einsum("hd,yd->hy", queries, rel_height)
    cols = np.einsum("hd,xd->hx", queries, rel_width)
    return rows[:, :, None] + cols[:, None, :]


def mean_queries(model: Any, variables: Any, images: Any, attention_path: str,
                 num_heads: int, head_dim: int) -> np.ndarray:
    """``[heads, head_dim]``: the unscaled queries of the attention layer at
    ``attention_path`` (e.g. ``"stage4/block0/spatial/attn"``), averaged over images and
    positions -- the typical query for :func:`relative_logit_profile`. Read from the
    layer's fused ``qkv`` projection (queries first) with flax's ``capture_intermediates``.
    """
    import jax

    target = f"{attention_path}/qkv"
    state = jax.jit(lambda v, x: model.apply(
        v, x, train=False, mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: "/".join(mdl.path) == target,
    )[1])(variables, images)
    node = state.get("intermediates", {})
    for part in target.split("/"):
        if part not in node:
            raise ValueError(f"no qkv projection at {target!r}; is {attention_path!r} the "
                             "path of a self-attention layer (see attention_maps paths)?")
        node = node[part]
    qkv = np.asarray(node["__call__"][0], np.float64)
    q = qkv[..., :num_heads * head_dim].reshape(-1, num_heads, head_dim)
    return q.mean(axis=0)


def upsample(cells: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of ``[..., h, w]`` cell values to ``image_hw`` pixels (each
    cell becomes the block of pixels it covers)."""
    cells = np.asarray(cells)
    h, w = cells.shape[-2:]
    rows = np.minimum((np.arange(image_hw[0]) * h) // image_hw[0], h - 1)
    cols = np.minimum((np.arange(image_hw[1]) * w) // image_hw[1], w - 1)
    return cells[..., rows[:, None], cols[None, :]]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(predictions)), 1)
    return out


def to_uint8_image(image: np.ndarray) -> np.ndarray:
    """An image rescaled to its own min..max as uint8 RGB ``[H, W, 3]`` (for display of
    normalised model inputs)."""
    image = np.asarray(image, np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    lo, hi = image.min(), image.max()
    return np.round(255 * (image - lo) / max(hi - lo, 1e-12)).astype(np.uint8)


def attention_overlay(image: np.ndarray, cells: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``image`` with one ``[h, w]`` attention map blended in red
    (normalised to its maximum) -- the TensorBoard picture."""
    base = to_uint8_image(image).astype(np.float64)
    heat = upsample(np.asarray(cells, np.float64), base.shape[:2])
    heat = heat / max(heat.max(), 1e-12)
    red = np.zeros_like(base)
    red[..., 0] = 255.0
    a = alpha * heat[..., None]
    return np.round((1 - a) * base + a * red).astype(np.uint8)


def attention_summary_images(images: np.ndarray, maps: Sequence[Any], max_layers: int = 4,
                             min_size: int = 128) -> np.ndarray:
    """uint8 ``[N * L, H', W', 3]`` for ``writer.write_images``: for each of the ``N``
    images and each of up to ``L = max_layers`` captured layers
    (:class:`~hybrid_attn.models.capture.AttentionMap`, image-major), the head-averaged
    weights of the query at the centre of the map, with the key grid stretched over the
    image. Images smaller than ``min_size`` pixels are enlarged by a whole factor
    (nearest neighbour) so TensorBoard shows them at a readable size."""
    images = np.asarray(images)
    scale = max(1, -(-min_size // max(images.shape[1], 1)))
    out = []
    for b in range(images.shape[0]):
        for m in list(maps)[:max_layers]:
            w = np.asarray(m.weights[b])
            centre = (m.query_hw[0] // 2, m.query_hw[1] // 2)
            over = attention_overlay(images[b], query_maps(w, centre).mean(axis=0))
            out.append(over.repeat(scale, axis=0).repeat(scale, axis=1))
    if not out:
        return np.zeros((0, images.shape[1] * scale, images.shape[2] * scale, 3), np.uint8)
    return np.stack(out)


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` of the scalars the trainer wrote to ``workdir``'s
    TensorBoard events (clu writes them as tensor summaries)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    if not os.path.isdir(workdir):
        return {}
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("tensors", []):
        events = acc.Tensors(tag)
        values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if all(v.size == 1 for v in values):
            out[tag] = (np.array([e.step for e in events]),
                        np.array([float(v.reshape(())) for v in values]))
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


# ----------------------------------------------------------------------------------------
# Plots (matplotlib, imported lazily). Each returns the Figure; ``save`` writes a PNG.


def _plt():
    import matplotlib

    if "MPLBACKEND" not in os.environ and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def save(fig: Any, path: str, dpi: int = 80) -> str:
    """Writes ``fig`` as a PNG (creating the folder) and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _cell_to_pixel(map_hw: Sequence[int], image_hw: Sequence[int]) -> tuple[float, float]:
    return image_hw[0] / map_hw[0], image_hw[1] / map_hw[1]


def _rect(plt, box, scale, **kw):
    (r0, c0, r1, c1), (sy, sx) = box, scale
    return plt.Rectangle((c0 * sx - 0.5, r0 * sy - 0.5), (c1 - c0) * sx, (r1 - r0) * sy,
                         fill=False, **kw)


def plot_query_attention(image: np.ndarray, weights: np.ndarray, query: Sequence[int],
                         query_hw: Sequence[int], title: str = "") -> Any:
    """One panel per head: the weights of ``query`` (query-map cell) over the image, with
    the query marked. ``weights`` is one image's ``[heads, Hq, Wq, Hk, Wk]``."""
    plt = _plt()
    maps = query_maps(weights, query)
    img = to_uint8_image(image)
    heads = maps.shape[0]
    fig, axes = plt.subplots(1, heads, figsize=(2.2 * heads, 2.5), squeeze=False)
    sy, sx = _cell_to_pixel(query_hw, img.shape[:2])
    for h, ax in enumerate(axes[0]):
        ax.imshow(img)
        ax.imshow(upsample(maps[h], img.shape[:2]), cmap="inferno", alpha=0.6)
        ax.plot((query[1] + 0.5) * sx - 0.5, (query[0] + 0.5) * sy - 0.5, "c+", ms=10, mew=2)
        ax.set_title(f"head {h}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def plot_local_window(image: np.ndarray, map_hw: Sequence[int], query: Sequence[int],
                      kernel: int, weights: np.ndarray | None = None, title: str = "") -> Any:
    """The ``kernel x kernel`` window of a border ``query``: attended keys (clipped window,
    green) against the full window outline (dashed) whose outside part the mask removes;
    with ``weights`` (``[heads, Hk, Wk]`` of that query) the head-mean weights beside it."""
    plt = _plt()
    img = to_uint8_image(image)
    support = window_support(map_hw, query, kernel)
    scale = _cell_to_pixel(map_hw, img.shape[:2])
    panels = 1 if weights is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(img)
    ax.imshow(np.ma.masked_where(~upsample(support, img.shape[:2]),
                                 np.ones(img.shape[:2])), cmap="summer", alpha=0.45, vmin=0)
    r = kernel // 2
    box = (query[0] - r, query[1] - r, query[0] + r + 1, query[1] + r + 1)
    ax.add_patch(_rect(plt, box, scale, ls="--", ec="yellow", lw=1.5))
    # Zoom on the window: kernel cells of context around it, including outside the image.
    ax.set_xlim((query[1] - 2 * kernel) * scale[1], (query[1] + 2 * kernel + 1) * scale[1])
    ax.set_ylim((query[0] + 2 * kernel + 1) * scale[0], (query[0] - 2 * kernel) * scale[0])
    ax.set_title(f"{kernel}x{kernel} window at {tuple(query)}: {int(support.sum())} of "
                 f"{kernel * kernel} keys in the image", fontsize=8)
    ax.axis("off")
    if weights is not None:
        axes[0, 1].imshow(np.asarray(weights).mean(axis=0), cmap="inferno")
        axes[0, 1].set_title("captured weights (head mean)", fontsize=8)
        axes[0, 1].axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def plot_lsa_gsa(image: np.ndarray, map_hw: Sequence[int], query: Sequence[int], window: int,
                 key_hw: Sequence[int], key_stride: Sequence[int],
                 lsa_weights: np.ndarray | None = None,
                 gsa_weights: np.ndarray | None = None, title: str = "") -> Any:
    """Twins side by side: LSA's window grid with the query's window highlighted, and GSA's
    sub-sampled key grid (one box per key); captured head-mean weights of the query over
    each when given (``[heads, Hk, Wk]``)."""
    plt = _plt()
    img = to_uint8_image(image)
    scale = _cell_to_pixel(map_hw, img.shape[:2])
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    q_px = ((query[1] + 0.5) * scale[1] - 0.5, (query[0] + 0.5) * scale[0] - 0.5)
    for ax in axes:
        ax.imshow(img)
    own = lsa_window(map_hw, query, window)
    if lsa_weights is not None:
        axes[0].imshow(upsample(np.asarray(lsa_weights).mean(0), img.shape[:2]),
                       cmap="inferno", alpha=0.6)
    else:
        axes[0].imshow(np.ma.masked_where(~upsample(own, img.shape[:2]), np.ones(img.shape[:2])),
                       cmap="summer", alpha=0.45, vmin=0)
    n_rows, n_cols = -(-map_hw[0] // window), -(-map_hw[1] // window)
    for a in range(n_rows):
        for b in range(n_cols):
            box = (a * window, b * window, min((a + 1) * window, map_hw[0]),
                   min((b + 1) * window, map_hw[1]))
            axes[0].add_patch(_rect(plt, box, scale, ec="white", lw=0.6))
    axes[0].set_title(f"LSA: {window}x{window} windows ({n_rows}x{n_cols})", fontsize=8)
    if gsa_weights is not None:
        key_px = upsample(np.asarray(gsa_weights).mean(0),
                          (key_hw[0] * key_stride[0], key_hw[1] * key_stride[1]))
        full = np.zeros(tuple(map_hw))
        full[:key_px.shape[0], :key_px.shape[1]] = key_px
        axes[1].imshow(upsample(full, img.shape[:2]), cmap="inferno", alpha=0.6)
    for box in key_cells(key_hw, key_stride).reshape(-1, 4):
        axes[1].add_patch(_rect(plt, box, scale, ec="white", lw=0.6))
    axes[1].set_title(f"GSA: {key_hw[0]}x{key_hw[1]} sub-sampled keys (sr={key_stride[0]})",
                      fontsize=8)
    for ax in axes:
        ax.plot(*q_px, "c+", ms=10, mew=2)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def plot_offset_tables(images: np.ndarray, title: str = "") -> Any:
    """Per-head ``[heads, 2H-1, 2W-1]`` offset images (:func:`bias_offset_images`,
    :func:`relative_logit_profile`), centre = offset 0 (marked), diverging colours."""
    plt = _plt()
    images = np.asarray(images)
    heads, hh, ww = images.shape
    cols = min(heads, 8)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.axis("off")
        if h >= heads:
            continue
        lim = max(np.abs(images[h]).max(), 1e-12)
        ax.imshow(images[h], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.plot((ww - 1) / 2, (hh - 1) / 2, "k+", ms=6)
        ax.set_title(f"head {h}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def plot_attention_distance(distances: Mapping[str, np.ndarray], title: str = "") -> Any:
    """ViT Fig. 7: one column per layer (in order), one dot per head's mean distance."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * len(distances) + 1.5), 2.8))
    for x, d in enumerate(distances.values()):
        d = np.asarray(d)
        ax.scatter(np.full(d.shape, x), d, s=12)
    ax.set_xticks(range(len(distances)))
    ax.set_xticklabels(list(distances), rotation=90, fontsize=6)
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title(title, fontsize=9)
    return fig


def plot_curves(runs: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                tags: Sequence[str] = ("train_loss", "eval_accuracy")) -> Any:
    """One panel per tag, one line per run (``{run: read_scalars(workdir)}``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tags), figsize=(3.6 * len(tags), 2.8), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for name, scalars in runs.items():
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, marker="." if len(steps) < 20 else None, label=name)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    return fig


def plot_confusion(matrix: np.ndarray, title: str = "") -> Any:
    """A confusion matrix (rows: true class, columns: predicted) with counts."""
    plt = _plt()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=6,
                    color="white" if n > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return fig


def plot_images(images: np.ndarray, captions: Sequence[str], title: str = "",
                max_images: int = 24) -> Any:
    """A grid of images (e.g. the misclassified digits) with one caption each."""
    plt = _plt()
    n = min(len(images), max_images)
    cols = min(max(n, 1), 8)
    rows = max(-(-n // cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(to_uint8_image(images[k]))
            ax.set_title(captions[k], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig
