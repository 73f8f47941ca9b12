"""HaloNet attention against a brute-force loop over query blocks on a non-square map, and
against timm's ``HaloAttn`` (tests/goldens/byoanet_halo.npz, the paper's block 8, halo 3)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from conftest import softmax

from hybrid_attn.models.layers.halo_attention import HaloAttention

GOLDENS = pathlib.Path(__file__).parent / "goldens"


def brute_force(x: np.ndarray, p: dict, heads: int, block: int, halo: int) -> np.ndarray:
    """timm's semantics by loops: the query at (i, j) of block (bi, bj) attends to the
    (block + 2 halo)^2 key window starting at (bi * block - halo, bj * block - halo);
    window keys outside the image are zero vectors (not masked). Logits are
    ``q . k / sqrt(d) + q . rel_h[a - i' + win - 1] + q . rel_w[c - j' + win - 1]`` with
    (a, c) the key's index in its window and (i', j') the query's index in its block."""
    b, h, w, _ = x.shape
    qkv = (x @ p["qkv"]["kernel"]).reshape(b, h, w, 3, heads, -1)
    d, win = qkv.shape[-1], block + 2 * halo
    rel_h, rel_w = p["position"]["rel_height"], p["position"]["rel_width"]
    out = np.zeros((b, h, w, heads, d))
    for i in range(h):
        for j in range(w):
            q = qkv[:, i, j, 0]  # [B, heads, d]
            logits, values = [], []
            for a in range(win):
                for c in range(win):
                    y, xx = i // block * block - halo + a, j // block * block - halo + c
                    inside = 0 <= y < h and 0 <= xx < w
                    k = qkv[:, y, xx, 1] if inside else np.zeros_like(q)
                    values.append(qkv[:, y, xx, 2] if inside else np.zeros_like(q))
                    pos = rel_h[a - i % block + win - 1] + rel_w[c - j % block + win - 1]
                    logits.append((q * k).sum(-1) / np.sqrt(d) + q @ pos)
            weights = softmax(np.stack(logits, -1))  # [B, heads, keys]
            out[:, i, j] = np.einsum("bhk,kbhd->bhd", weights, np.stack(values))
    return out.reshape(b, h, w, -1)


def test_matches_brute_force_on_a_non_square_map():
    layer = HaloAttention(8, num_heads=2, block_size=3, halo_size=1)
    x = np.random.default_rng(0).normal(size=(2, 6, 9, 5))
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x.astype(np.float32))
    assert shapes["params"]["position"]["rel_height"].shape == (9, 4)  # 2 * (3 + 2) - 1
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape) * 0.5, shapes)["params"]
    f32 = jax.tree_util.tree_map(lambda a: a.astype(np.float32), params)
    got = jax.jit(layer.apply)({"params": f32}, x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), brute_force(x, params, 2, 3, 1),
                               atol=1e-4, rtol=1e-4)


def test_defaults_are_the_papers_and_match_timm_halo_attn():
    """timm's q conv [heads * d, C] and kv conv laid out [heads, (k | v), d] map onto our
    fused ``qkv`` ``[3, heads, d]``; the output must equal timm's on a 16x24 map."""
    z = np.load(GOLDENS / "byoanet_halo.npz")
    x, heads = z["s1/input"].astype(np.float32), 4
    c = x.shape[-1]
    q = z["s1/q"][:, :, 0, 0].T
    kv = z["s1/kv"][:, :, 0, 0].reshape(heads, 2, -1, c)
    k, v = (kv[:, n].reshape(-1, c).T for n in (0, 1))
    params = {"qkv": {"kernel": np.concatenate([q, k, v], 1)},
              "position": {"rel_height": z["s1/height_rel"], "rel_width": z["s1/width_rel"]}}
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    layer = HaloAttention(c, num_heads=heads)  # block 8, halo 3: win 14, tables 27 rows
    assert params["position"]["rel_height"].shape == (27, c // heads)
    got = jax.jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), z["s1/output"], atol=1e-5, rtol=1e-5)
    # timm's zero keys at the border matter: masking them instead does not match.
    masked = layer.clone(pattern=dataclasses.replace(layer.pattern, padding="mask"))
    assert np.abs(np.asarray(masked.apply({"params": params}, x)) - z["s1/output"]).max() > 1e-2
