"""The pictures' numbers, each checked against its meaning: brute-force neighbourhoods,
captured weights of real layers, hand-computed distances, and the position modules."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn import viz
from hybrid_attn.models.layers.attention import Attention, Blocked, Global, Subsampled
from hybrid_attn.models.layers.local_attention import LocalSelfAttention
from hybrid_attn.models.layers.position import Grid
from hybrid_attn.models.layers.relative_bias import RelativeBias2D
from hybrid_attn.models.layers.relative_logits import RelativeLogits2D


def captured(layer, x):
    """(AttentionMap, output) of one Attention layer applied to ``x``."""
    variables = layer.init(jax.random.PRNGKey(0), x)
    out, state = layer.apply(variables, x, mutable=["attention"])
    return state["attention"]["maps"][0], out


def brute_neighbourhood(h, w, query, k):
    i, j = query
    return {(a, b) for a, b in itertools.product(range(h), range(w))
            if abs(a - i) <= k // 2 and abs(b - j) <= k // 2}


def test_local_window_support_is_the_clipped_neighbourhood():
    h, w, k = 9, 10, 5
    layer = LocalSelfAttention(features=8, num_heads=2, kernel_size=k, block_size=4)
    m, _ = captured(layer, jax.random.normal(jax.random.PRNGKey(1), (1, h, w, 8)))
    assert m.kind == "blocked" and m.key_stride == (1, 1)
    for query in [(0, 0), (0, 5), (8, 9), (4, 4)]:
        expected = brute_neighbourhood(h, w, query, k)
        assert set(zip(*np.nonzero(viz.window_support((h, w), query, k)))) == expected
        # ... and it is exactly where SASA's captured weights are non-zero.
        for head in viz.query_maps(np.asarray(m.weights[0]), query):
            assert set(zip(*np.nonzero(head))) == expected
            np.testing.assert_allclose(head.sum(), 1.0, rtol=1e-5)


def test_lsa_window_is_the_captured_block_including_a_clipped_border_window():
    h, w, win = 10, 10, 4
    layer = Attention(num_heads=1, pattern=Blocked(win))
    m, _ = captured(layer, jax.random.normal(jax.random.PRNGKey(2), (1, h, w, 8)))
    for query in [(0, 0), (5, 6), (9, 9)]:
        got = np.asarray(m.weights[0, 0, query[0], query[1]]) > 0
        i0, j0 = (query[0] // win) * win, (query[1] // win) * win
        expected = {(a, b) for a, b in itertools.product(range(h), range(w))
                    if i0 <= a < i0 + win and j0 <= b < j0 + win}
        assert set(zip(*np.nonzero(viz.lsa_window((h, w), query, win)))) == expected
        assert set(zip(*np.nonzero(got))) == expected


@pytest.mark.parametrize("hw, sr", [((8, 8), 2), ((12, 8), 4), ((9, 7), 3)])
def test_gsa_key_grid_has_h_over_sr_by_w_over_sr_cells_tiling_the_map(hw, sr):
    layer = Attention(num_heads=2, pattern=Subsampled(sr))
    m, _ = captured(layer, jax.random.normal(jax.random.PRNGKey(3), (1, *hw, 8)))
    assert m.kind == "subsampled"
    assert m.key_hw == (hw[0] // sr, hw[1] // sr) and m.key_stride == (sr, sr)
    boxes = viz.key_cells(m.key_hw, m.key_stride)
    assert boxes.shape == (hw[0] // sr, hw[1] // sr, 4)
    covered = np.zeros(hw, int)
    for r0, c0, r1, c1 in boxes.reshape(-1, 4):
        assert r1 - r0 == sr and c1 - c0 == sr
        covered[r0:r1, c0:c1] += 1
    # Each pixel the sr conv reads belongs to exactly one key; the remainder to none.
    assert (covered[: hw[0] // sr * sr, : hw[1] // sr * sr] == 1).all()
    assert covered.sum() == (hw[0] // sr) * (hw[1] // sr) * sr * sr


def test_attention_distance_hand_computed():
    # One-hot on self: 0. One-hot on key (0, 0) of a 2x2 map: distances 0, 1, 1, sqrt 2.
    eye = np.eye(4).reshape(1, 2, 2, 2, 2)
    assert viz.attention_distance(eye) == pytest.approx([0.0])
    corner = np.zeros((1, 2, 2, 2, 2))
    corner[..., 0, 0] = 1.0
    assert viz.attention_distance(corner, pixels_per_cell=16.0) == pytest.approx(
        [16 * (2 + math.sqrt(2)) / 4])
    # Uniform over a 1x2 map: every query is 0 and 1 cells from the keys: 0.5.
    assert viz.attention_distance(np.full((1, 1, 2, 1, 2), 0.5)) == pytest.approx([0.5])
    # One sub-sampled key (stride 4) over a 4x4 map: its centre is (2, 2).
    one_key = np.ones((1, 2, 4, 4, 1, 1))  # one image, two heads
    expected = (4 * math.sqrt(0.5) + 8 * math.sqrt(2.5) + 4 * math.sqrt(4.5)) / 16
    assert viz.attention_distance(one_key, (4, 4)) == pytest.approx([expected, expected])


def test_attention_distance_of_captured_global_attention_matches_a_loop():
    layer = Attention(num_heads=2, pattern=Global())
    m, _ = captured(layer, jax.random.normal(jax.random.PRNGKey(4), (2, 3, 4, 8)))
    w = np.asarray(m.weights)
    total = np.zeros(2)
    for b, h, i, j, a, c in itertools.product(range(2), range(2), range(3), range(4),
                                              range(3), range(4)):
        total[h] += w[b, h, i, j, a, c] * math.hypot(i - a, j - c)
    np.testing.assert_allclose(viz.attention_distance(w), total / (2 * 12), rtol=1e-6)


def test_bias_offset_images_index_by_key_minus_query():
    h, w, heads = 3, 4, 2
    module = RelativeBias2D()
    grid = Grid((h, w), (h, w))
    variables = module.init(jax.random.PRNGKey(5), grid, heads, 8)
    term = module.apply(variables, grid, heads, 8)
    logits = np.asarray(term(jnp.zeros((1, h * w, heads, 8))))  # [heads, HW, HW]
    images = viz.bias_offset_images(variables["params"]["relative_bias_table"])
    assert images.shape == (heads, 2 * h - 1, 2 * w - 1)
    for (i, j), (a, b) in itertools.product(itertools.product(range(h), range(w)), repeat=2):
        np.testing.assert_allclose(logits[:, i * w + j, a * w + b],
                                   images[:, a - i + h - 1, b - j + w - 1], rtol=1e-6)


def test_relative_logit_profile_is_what_a_constant_query_sees():
    h, w, heads, d = 3, 4, 2, 8
    module = RelativeLogits2D(scale_query=False)
    grid = Grid((h, w), (h, w))
    variables = module.init(jax.random.PRNGKey(6), grid, heads, d)
    term = module.apply(variables, grid, heads, d)
    q = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (heads, d)))
    logits = np.asarray(term(jnp.broadcast_to(q, (1, h * w, heads, d))))[0]
    p = variables["params"]
    profile = viz.relative_logit_profile(p["rel_height"], p["rel_width"], q)
    for (i, j), (a, b) in itertools.product(itertools.product(range(h), range(w)), repeat=2):
        np.testing.assert_allclose(logits[:, i * w + j, a * w + b],
                                   profile[:, a - i + h - 1, b - j + w - 1], rtol=1e-5,
                                   atol=1e-5)


def test_mean_queries_average_the_q_projection():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return Attention(features=8, num_heads=2, name="attn")(nn.Dense(8, name="in")(x))

    x = jax.random.normal(jax.random.PRNGKey(8), (2, 3, 3, 5))
    net = Net()
    v = net.init(jax.random.PRNGKey(9), x)
    p = v["params"]
    hidden = np.asarray(x) @ np.asarray(p["in"]["kernel"]) + np.asarray(p["in"]["bias"])
    qkv = p["attn"]["qkv"]
    q = hidden @ np.asarray(qkv["kernel"])[:, :8] + np.asarray(qkv["bias"])[:8]
    got = viz.mean_queries(net, v, x, "attn", num_heads=2, head_dim=4)
    np.testing.assert_allclose(got, q.reshape(-1, 2, 4).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no qkv projection"):
        viz.mean_queries(net, v, x, "nope", num_heads=2, head_dim=4)


def test_upsample_overlay_and_confusion():
    cells = np.arange(6.0).reshape(2, 3)
    up = viz.upsample(cells, (4, 6))
    np.testing.assert_array_equal(up[::2, ::2], cells)
    np.testing.assert_array_equal(up[1::2, 1::2], cells)
    image = np.zeros((4, 6, 3))
    heat = np.zeros((2, 3))
    heat[1, 2] = 1.0
    over = viz.attention_overlay(image, heat)
    assert over.dtype == np.uint8 and over.shape == (4, 6, 3)
    assert (over[2:, 4:, 0] > 0).all() and (over[:2, :, 0] == 0).all()
    labels, preds = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 0])
    cm = viz.confusion_matrix(labels, preds, 3)
    brute = np.array([[sum(1 for y, p in zip(labels, preds) if y == t and p == q)
                       for q in range(3)] for t in range(3)])
    np.testing.assert_array_equal(cm, brute)


def test_summary_images_mark_the_centre_query_of_every_image_and_layer():
    layer = Attention(num_heads=2, pattern=Blocked(2))
    m, _ = captured(layer, jax.random.normal(jax.random.PRNGKey(10), (2, 4, 4, 8)))
    images = viz.attention_summary_images(np.zeros((2, 8, 8, 3)), [m, m], min_size=0)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8  # 2 images x 2 layers
    for picture in images:
        # The centre query (2, 2) sees only its 2x2 block: pixels 4..8 of the 8x8 image.
        assert (picture[4:, 4:, 0] > 0).all()
        assert (picture[:4].sum() == 0) and (picture[:, :4].sum() == 0)
    # Small inputs are enlarged by a whole factor, each pixel a block.
    big = viz.attention_summary_images(np.zeros((1, 8, 8, 3)), [m], min_size=20)
    assert big.shape == (1, 24, 24, 3)
    np.testing.assert_array_equal(big[0, ::3, ::3], images[0])
    assert viz.attention_summary_images(np.zeros((1, 8, 8, 3)), [], min_size=0).shape == (
        0, 8, 8, 3)


def test_read_scalars_reads_clu_events(tmp_path):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"train_loss": 1.0 / step})
    writer.flush()
    steps, values = viz.read_scalars(str(tmp_path))["train_loss"]
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_allclose(values, [1.0, 0.5, 1.0 / 3], rtol=1e-6)


def test_every_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3))
    w = rng.random((2, 4, 4, 4, 4))
    figs = {
        "query": viz.plot_query_attention(image, w, (0, 1), (4, 4)),
        "window": viz.plot_local_window(image, (8, 8), (0, 3), 5, weights=w[:, 0, 0]),
        "twins": viz.plot_lsa_gsa(image, (8, 8), (1, 1), 4, (2, 2), (4, 4),
                                  lsa_weights=rng.random((2, 8, 8)),
                                  gsa_weights=rng.random((2, 2, 2))),
        "tables": viz.plot_offset_tables(rng.normal(size=(3, 7, 7))),
        "distance": viz.plot_attention_distance({"a": [1, 2], "b": [3, 4]}),
        "curves": viz.plot_curves({"x": {"train_loss": (np.arange(3), np.ones(3))}}),
        "confusion": viz.plot_confusion(np.eye(3, dtype=int)),
        "images": viz.plot_images(rng.random((3, 8, 8, 3)), ["a", "b", "c"]),
    }
    for name, fig in figs.items():
        path = viz.save(fig, str(tmp_path / f"{name}.png"))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the 2x2 query map"):
        viz.query_maps(np.zeros((1, 2, 2, 2, 2)), (2, 0))
    with pytest.raises(ValueError, match="odd"):
        viz.window_support((4, 4), (0, 0), 4)
    with pytest.raises(ValueError, match="2H-1"):
        viz.bias_offset_images(np.zeros((3, 3)))

