"""2-D position logits (BoTNet Fig. 4) against brute-force loops over query/key positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models.botnet import BoTAttention
from hybrid_attn.models.layers.position import Grid, relative_offsets
from hybrid_attn.models.layers.relative_logits import (
    AbsoluteLogits2D,
    RelativeLogits2D,
    position_term,
    resize_table,
)

H, W, HEADS, D = 5, 7, 2, 4  # non-square, so swapped heights/widths cannot pass


def _queries(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, H * W, HEADS, D)).astype(np.float32)


def _apply(module, q: np.ndarray, tables: dict) -> np.ndarray:
    term = module.apply({"params": tables}, Grid((H, W), (H, W)), HEADS, D)
    return np.asarray(term(jnp.asarray(q)))


@pytest.mark.parametrize("scale_query", [True, False])
def test_relative_logits_match_brute_force(scale_query):
    rng = np.random.default_rng(1)
    rel_h = rng.standard_normal((2 * H - 1, D)).astype(np.float32)
    rel_w = rng.standard_normal((2 * W - 1, D)).astype(np.float32)
    q = _queries()
    got = _apply(RelativeLogits2D(scale_query=scale_query), q,
                 {"rel_height": rel_h, "rel_width": rel_w})
    assert got.shape == (2, HEADS, H * W, H * W)

    qs = q * D**-0.5 if scale_query else q
    want = np.zeros_like(got)
    for b in range(2):
        for n in range(HEADS):
            for i in range(H * W):
                qi_row, qi_col = divmod(i, W)
                for j in range(H * W):
                    kj_row, kj_col = divmod(j, W)
                    want[b, n, i, j] = (qs[b, i, n] @ rel_h[kj_row - qi_row + H - 1]
                                        + qs[b, i, n] @ rel_w[kj_col - qi_col + W - 1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_absolute_logits_match_brute_force():
    rng = np.random.default_rng(2)
    emb_h = rng.standard_normal((H, D)).astype(np.float32)
    emb_w = rng.standard_normal((W, D)).astype(np.float32)
    q = _queries()
    got = _apply(AbsoluteLogits2D(scale_query=False), q, {"abs_height": emb_h, "abs_width": emb_w})
    want = np.zeros_like(got)
    for i in range(H * W):
        for j in range(H * W):
            row, col = divmod(j, W)
            want[:, :, i, j] = np.einsum("bnd,d->bn", q[:, i], emb_h[row] + emb_w[col])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_table_shapes_follow_the_traced_map():
    v = jax.eval_shape(lambda: RelativeLogits2D().init(
        jax.random.PRNGKey(0), Grid((H, W), (H, W)), HEADS, D))
    assert v["params"]["rel_height"].shape == (2 * H - 1, D)
    assert v["params"]["rel_width"].shape == (2 * W - 1, D)


def test_table_for_another_map_is_a_clear_error():
    params = {"params": {"rel_height": np.zeros((2 * H - 1, D)),
                         "rel_width": np.zeros((2 * W - 1, D))}}
    with pytest.raises(ValueError, match=r"rel_height has shape \(9, 4\) but the 7x7 feature "
                                         r"map of this input needs \(13, 4\)"):
        RelativeLogits2D().apply(params, Grid((7, 7), (7, 7)), HEADS, D)
    with pytest.raises(ValueError, match="unstrided keys"):
        RelativeLogits2D().apply(params, Grid((H, W), (3, 4), k_stride=(2, 2)), HEADS, D)


def test_relative_offsets_are_key_minus_query():
    """One sign for every family: key position - query position (here a 2-query block
    against its 4 keys starting one pixel before it, and keys sub-sampled by 2)."""
    np.testing.assert_array_equal(relative_offsets(2, 4, start=-1), [[-1, 0, 1, 2],
                                                                     [-2, -1, 0, 1]])
    np.testing.assert_array_equal(relative_offsets(3, 2, stride=2), [[0, 2], [-1, 1], [-2, 0]])


def test_position_term_kinds():
    assert position_term("relative").func is RelativeLogits2D
    assert position_term("absolute", scale_query=False).func is AbsoluteLogits2D
    assert position_term("none") is None
    with pytest.raises(ValueError, match="relative, absolute, none"):
        position_term("rel")


def test_resize_table_interpolates_offsets_linearly():
    # A table linear in the offset stays linear (and keeps its end points) when resized,
    # so offset 0 stays the centre row: 7x7 -> 12x12 (13 -> 23 rows).
    offsets = np.arange(-6, 7, dtype=np.float32)
    table = np.stack([offsets, 2 * offsets + 1], axis=1)
    out = np.asarray(resize_table(table, 23))
    assert out.shape == (23, 2)
    np.testing.assert_allclose(out[11], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.diff(out[1:-1, 0]), np.diff(out[1:-1, 0])[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(resize_table(table, 13)), table)


def _reference_mha(x: np.ndarray, kernel: np.ndarray, heads: int) -> np.ndarray:
    """Plain softmax attention over the flattened positions, in numpy."""
    b, n, c = x.shape
    d = kernel.shape[1] // (3 * heads)
    qkv = (x @ kernel).reshape(b, n, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, heads * d)


def test_content_only_attention_is_plain_mha_and_permutation_equivariant():
    x = np.random.default_rng(3).standard_normal((2, H, W, 8)).astype(np.float32)
    attn = BoTAttention(8, position="none")
    params = attn.init(jax.random.PRNGKey(0), x, train=False)
    assert set(params["params"]) == {"attn"} and set(params["params"]["attn"]) == {"qkv"}
    out = np.asarray(attn.apply(params, x, train=False)).reshape(2, H * W, 8)
    kernel = np.asarray(params["params"]["attn"]["qkv"]["kernel"])
    np.testing.assert_allclose(out, _reference_mha(x.reshape(2, H * W, 8), kernel, 4),
                               rtol=1e-5, atol=1e-5)

    perm = np.random.default_rng(4).permutation(H * W)
    x_perm = x.reshape(2, H * W, 8)[:, perm].reshape(2, H, W, 8)
    out_perm = np.asarray(attn.apply(params, x_perm, train=False)).reshape(2, H * W, 8)
    np.testing.assert_allclose(out_perm, out[:, perm], rtol=1e-5, atol=1e-5)

    # Relative logits break that symmetry: the same check must fail with them on.
    rel = BoTAttention(8, position="relative")
    rel_params = rel.init(jax.random.PRNGKey(1), x, train=False)
    rel_out = np.asarray(rel.apply(rel_params, x, train=False)).reshape(2, H * W, 8)
    rel_perm = np.asarray(rel.apply(rel_params, x_perm, train=False)).reshape(2, H * W, 8)
    assert np.abs(rel_perm - rel_out[:, perm]).max() > 1e-3
