"""Attention kernels: pure functions from projected queries, keys and values to outputs.

No parameters and no scopes, so they run under ``vmap`` / ``lax.map`` and are tested on
their own. :func:`dot_product_attention` attends over all keys; :func:`blocked_attention`
attends from each query block to that block plus a halo (window attention, SASA's k x k
neighbourhoods, HaloNet's haloed blocks, MaxViT's block attention), laid out by a
:class:`BlockLayout`. :func:`fused_dot_product_attention` is the global kernel's fast path
when no weights and no dropout are needed (``jax.nn.dot_product_attention``: cuDNN on GPU).
Logits and the softmax always run in float32, and both return the
softmax weights next to the output (for attention capture; unused weights cost nothing
under ``jit``, and the blocked kernel builds them only when asked).

Why blocked attention is memory-efficient for SASA's k x k neighbourhoods: the naive port
unfolds a k x k copy of the keys and values for every pixel (k*k = 49 times the map). Here
the map is cut into query blocks of b x b pixels; each block attends to its own pixels
plus a halo of k//2 pixels on every side (Vaswani et al. 2021, "blocked local attention"),
with a mask keeping each query to its own k x k window. Rows of blocks, and groups of
``batch_chunk`` images, are processed one after another (``row_chunk``) in a loop
rematerialised in the backward pass, so only one step's key/value copy (``((b + k - 1) /
b)^2`` of its rows) and logits (``(b + k - 1)^2`` per query and head) are alive at a time.
Each step gathers its queries, keys and values straight from the unpadded map (from the
fused projection's output, :func:`blocked_attention_packed`), at clamped indices where a
key falls outside the image (it is masked anyway): no padded or split copy of q, k, v
exists, and the backward pass scatters into one cotangent of the projection. An axis that
fits in one block gets no halo (it would hold only masked padding), so a map smaller than
the window costs no more than global attention.
Blocks that tile the map with no halo (Twins' LSA at 224) skip the gathers: each step's
rows are a reshape of the map, so the backward pass is a transpose, not a scatter-add; with
no mask, position term, dropout or captured weights and no ``row_chunk`` loop, all windows
are one :func:`stacked_attention` on a single head-major transpose of q, k, v.

XLA temporary memory (``jax.jit(f).lower(...).compile().memory_analysis()``) and time
(best of 5 calls) of SASA's layer for batch 8 on a 56x56x64 map (6.1 MiB; 8 heads, k = 7),
next to a 3x3 conv 64 -> 64; forward + backward is the gradient of params and input (as
``python -m hybrid_attn.bench --layer`` compiles it). 2-core AMD EPYC VM (AVX2), float32,
jax 0.10.2:

    op                                                     forward  forward + backward
    3x3 convolution                                0.0 MiB   28 ms    18.4 MiB  145 ms
    defaults (b 4, row_chunk 1, batch_chunk 4)    28.1 MiB  154 ms    48.8 MiB  432 ms
    b 4, batch_chunk None                         31.7 MiB  138 ms    60.9 MiB  486 ms
    b 2, batch_chunk 4                            28.4 MiB   61 ms    46.3 MiB  332 ms
    b 8, batch_chunk 4                            39.1 MiB  283 ms    73.7 MiB  864 ms
    b 4, all blocks at once (row_chunk None)     165.4 MiB  414 ms   400.2 MiB  635 ms
    1a502e2: padded, split q/k/v (bench median)   39.5 MiB  220 ms    68.5 MiB  599 ms

Of the default's forward 28.1 MiB, 18.4 MiB are the q/k/v projection itself (3x the map,
kept for the backward pass); the backward adds its cotangent (another 18.4 MiB) and one
step's logits. At 28x28x128 and 14x14x256 b = 4 was the faster block (b = 2 at 56x56);
batch_chunk 4 was faster than None at every map measured (also at batch 32). Smaller
blocks waste fewer logits on masked keys ((b + k - 1)^2 per query against k^2 needed) at
the price of more key/value duplication. A naive k x k unfold of keys and values needed
906 / 1220 MiB.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hybrid_attn.models.layers.platform import platform_dependent
from hybrid_attn.models.layers.position import Grid, LogitTerm


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``softmax(q k^T + bias) v`` over the key axis; returns (output, float32 weights).

    Args:
      q: ``[..., Nq, heads, d]`` queries, already scaled.
      k: ``[..., Nk, heads, d]`` keys.
      v: ``[..., Nk, heads, dv]`` values.
      bias: additive logits broadcastable to ``[..., heads, Nq, Nk]``.
      mask: boolean, broadcastable to ``[..., heads, Nq, Nk]``; True means "may attend".
        Masked keys get weight exactly 0. A query whose keys are all masked gets uniform
        weights (callers drop such rows).
      dropout_rate: dropout on the attention weights (needs ``dropout_rng``); the returned
        weights are the ones before dropout.

    Returns:
      ``[..., Nq, heads, dv]`` in the dtype of ``v``, and the ``[..., heads, Nq, Nk]`` weights.
    """
    # Head-major operands ([..., heads, N, d]: one transpose each) make both products plain
    # batched matrix products. With the heads between the tokens and the channels, XLA:CPU
    # rearranged the operands inside each product: Twins-SVT-S's stage-1 LSA core (512
    # windows of 49 tokens, 2 heads of 32) took 23.5-39.8 ms forward against 9.9 head-major
    # (one thread), and its inference step 301.5 against 279.1 ms (two threads; 486.2
    # against 472.3 at one), the outputs bit for bit equal.
    q, k, v = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))
    logits = jnp.einsum("...hqd,...hkd->...hqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    used = weights
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        used = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("...hqk,...hkd->...hqd", used.astype(v.dtype), v)
    return jnp.swapaxes(out, -2, -3), weights


def _sum_leading_by_halves(x: jax.Array) -> jax.Array:
    """``x.sum(0)`` as pairwise adds of halves (elementwise passes, not a reduction)."""
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        pairs = x[:half] + x[half:2 * half]
        x = jnp.concatenate([pairs, x[2 * half:]]) if x.shape[0] % 2 else pairs
    return x[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_batch(bias: jax.Array, batch: int) -> jax.Array:
    """``bias`` ``[1, ...]`` broadcast to ``[batch, ...]``, whose gradient sums the batch.

    On CPU the sum is pairwise adds: XLA:CPU hands a reduction over the leading axis to
    YNNPACK, which took 13.2 ms for CoAtNet-0's stage-3 bias gradient ([8, 12, 196, 196],
    2 threads) where the adds took 0.6 ms (126 ms of its 2.4-s train step in all). Other
    backends keep the reduction.
    """
    return jnp.broadcast_to(bias, (batch, *bias.shape[1:]))


def _broadcast_batch_fwd(bias, batch):
    return broadcast_batch(bias, batch), None


def _broadcast_batch_bwd(batch, _, ct):
    total = platform_dependent(ct, cpu=_sum_leading_by_halves,
                               default=lambda ct: jnp.sum(ct, axis=0))
    return (total[None],)


broadcast_batch.defvjp(_broadcast_batch_fwd, _broadcast_batch_bwd)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x`` summed over the axes that ``shape`` broadcasts (its size-1 axes)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                      scale: float) -> jax.Array:
    """``softmax(q k^T * scale + bias) v`` (``[B, Nq, heads, d]`` queries, ``[B, Nk, heads,
    d]`` keys and values, ``bias`` broadcastable to ``[B, heads, Nq, Nk]`` or None), with
    the backward pass written out as flash attention's: ``ds = p * (dp - rowsum(do * o))``.

    Differentiated, the forward pass is :func:`dot_product_attention`'s (float32 logits and
    softmax) and keeps its weights for the backward pass. The gradient is the same
    function's, but autodiff of the softmax differentiates the normalisation as a division
    (three passes over the ``[B, heads, Nq, Nk]`` logits and a reduction over them) and
    XLA:CPU hands that to YNNPACK fused with the ``do v^T`` product, where the row sum over
    the output's ``d`` channels is one cheap pass. One thread, float32, batch 8, forward and
    backward, a 2-core Xeon (AVX-512), jax 0.10.2: Twins-SVT-S's stage-1 GSA core (3136
    queries, 49 keys, 2 heads of 32) 32.9 -> 25.6 ms, CoAtNet-0's stage-3 core with its bias
    (196 x 196, 8 heads) 23.2 -> 16.9 ms. Differentiated, its operands are also head-major
    (``[B, heads, N, d]``, one transpose each way; see :func:`dot_product_attention`):
    forward and backward, one / two threads, Twins-SVT-S's stage-1 GSA core 34.9 -> 21.9 /
    26.5 -> 14.3 ms, stage 3 (196 queries, 8 heads) 7.7 -> 5.8 / 6.4 -> 4.9 ms, CoAtNet-0's
    stage-3 core with its bias 26.3 -> 20.4 / 30.2 -> 22.2 ms. Not differentiated
    (inference) it is XLA's ``jax.nn.dot_product_attention``, the faster forward on its own
    at two threads.
    """
    return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, implementation="xla")


def _attention_fwd(q, k, v, bias, scale):
    """Head-major (``[..., heads, N, d]``) forward pass: output and float32 weights."""
    logits = jnp.einsum("...nd,...md->...nm", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("...nm,...md->...nd", weights.astype(v.dtype), v), weights


def _attention_bwd(scale, q, k, v, weights, out, d_out):
    """Head-major backward pass of :func:`_attention_fwd`: ``d_q, d_k, d_v`` and the float32
    ``d_logits``, flash attention's ``ds = p * (dp - rowsum(do * o))``."""
    d_v = jnp.einsum("...nm,...nd->...md", weights.astype(d_out.dtype), d_out)
    d_weights = jnp.einsum("...nd,...md->...nm", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    d_logits = weights * (d_weights - row[..., None])
    d_s = d_logits.astype(q.dtype)
    d_q = jnp.einsum("...nm,...md->...nd", d_s, k) * jnp.asarray(scale, k.dtype)
    d_k = jnp.einsum("...nm,...nd->...md", d_s, q) * jnp.asarray(scale, q.dtype)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_logits


def _softmax_attention_fwd(q, k, v, bias, scale):
    # Head-major ([B, heads, N, d]) operands and residuals, as in dot_product_attention: one
    # transpose of q, k, v and the output, and of the three gradients in the backward.
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    out, weights = _attention_fwd(q, k, v, bias, scale)
    return jnp.swapaxes(out, 1, 2), (q, k, v, bias, weights, out)


def _softmax_attention_bwd(scale, residuals, d_out):
    q, k, v, bias, weights, out = residuals  # head-major
    d_q, d_k, d_v, d_logits = _attention_bwd(scale, q, k, v, weights, out,
                                             jnp.swapaxes(d_out, 1, 2))
    d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
    return (jnp.swapaxes(d_q, 1, 2), jnp.swapaxes(d_k, 1, 2), jnp.swapaxes(d_v, 1, 2), d_bias)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def stacked_attention(qkv: jax.Array, scale: float) -> jax.Array:
    """``softmax(q k^T * scale) v`` of head-major ``q, k, v = qkv`` (``[3, ..., heads, N,
    d]``): ``[..., heads, N, d]``, float32 logits and softmax, with
    :func:`softmax_attention`'s written-out backward pass.

    The gradient is one stacked ``[3, ...]`` array (a concatenation), where ``qkv[0]``,
    ``qkv[1]``, ``qkv[2]`` taken by autodiff have three zero-padded gradients summed, so a
    fused projection's ``qkv``, transposed to windows once, is transposed back once.
    """
    return _attention_fwd(qkv[0], qkv[1], qkv[2], None, scale)[0]


def _stacked_attention_fwd(qkv, scale):
    out, weights = _attention_fwd(qkv[0], qkv[1], qkv[2], None, scale)
    return out, (qkv, weights, out)


def _stacked_attention_bwd(scale, residuals, d_out):
    qkv, weights, out = residuals
    d_q, d_k, d_v, _ = _attention_bwd(scale, qkv[0], qkv[1], qkv[2], weights, out, d_out)
    return (jnp.stack([d_q, d_k, d_v]),)


stacked_attention.defvjp(_stacked_attention_fwd, _stacked_attention_bwd)


def fused_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                bias: jax.Array | None = None, scale: float = 1.0,
                                backend: str | None = None, impl: str = "auto") -> jax.Array:
    """:func:`dot_product_attention`'s output (not its weights) through a fused kernel:
    cuDNN's (``jax.nn.dot_product_attention``) on GPU for bfloat16/float16 inputs where
    cuDNN takes the shapes and the bias, :func:`softmax_attention` on CPU, and XLA's
    implementation of ``jax.nn.dot_product_attention`` everywhere else (float32 logits and
    softmax, like :func:`dot_product_attention`).

    ``q`` ``[B, Nq, heads, d]`` (unscaled; ``scale`` multiplies the logits), ``k`` / ``v``
    ``[B, Nk, heads, d]``, ``bias`` broadcastable to ``[B, heads, Nq, Nk]``. ``backend``
    defaults to ``jax.default_backend()``. ``impl``: ``"auto"``, or ``"xla"`` /
    ``"softmax_attention"`` to force one of the non-cuDNN forms (tests, benchmarks). No
    dropout and no weights: callers that need either use :func:`dot_product_attention`, as
    does a value width other than the key width (timm's ECA BoTNet / HaloNet), which
    ``jax.nn.dot_product_attention`` rejects.
    """
    if impl not in ("auto", "xla", "softmax_attention"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'softmax_attention', got {impl!r}")
    if v.shape[-1] != k.shape[-1]:
        return dot_product_attention(q * jnp.asarray(scale, q.dtype), k, v, bias=bias)[0]
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    gpu = (backend or jax.default_backend()) in ("gpu", "cuda")
    if impl == "auto" and gpu and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # cuDNN rejects some head sizes, sequence lengths and bias layouts at trace time
            return jax.nn.dot_product_attention(q, k, v, bias, scale=scale,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError, TypeError):
            pass
    if bias is not None and bias.shape[0] == 1 < q.shape[0]:
        bias = broadcast_batch(bias, q.shape[0])
    xla = lambda q, k, v, b=None: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, b, scale=scale, implementation="xla")
    explicit = lambda q, k, v, b=None: softmax_attention(q, k, v, b, scale)  # noqa: E731
    operands = (q, k, v) if bias is None else (q, k, v, bias)  # no None through the switch
    if impl != "auto":
        return (xla if impl == "xla" else explicit)(*operands)
    return platform_dependent(*operands, cpu=explicit, default=xla)


def block_side(n: int, max_block: int, window: int) -> int:
    """A query block side for windowed attention (``window`` x ``window`` per query) along an
    axis of length ``n``; any side gives the same result, this one costs least.

    The whole axis when ``n <= window`` (every query then sees most of the axis, and one
    block has no halo: cheapest); otherwise the smallest side <= ``max_block`` that tiles
    ``n`` in the fewest blocks, minimising padding (``max_block = 8``: 56 -> 8, 28 -> 7).
    """
    if n <= window:
        return n
    return -(-n // -(-n // max_block))


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How :func:`blocked_attention` cuts an ``hw`` map: query blocks of ``block``, each
    attending to its block grown by ``halo`` on every side, optionally limited to a
    ``window`` around each query (odd sides).

    ``mask_outside=True``: keys outside the image are masked out (not tokens), and an axis
    that fits in one block gets no halo (it would hold only masked keys). ``False``: keys
    outside the image are zero vectors that take part in the softmax (timm's ``HaloAttn``
    pads keys and values with zeros after the projection), so the halo is always kept.
    Use :meth:`make`, which applies that rule.
    """

    hw: tuple[int, int]
    block: tuple[int, int]
    halo: tuple[int, int]
    window: tuple[int, int] | None = None
    mask_outside: bool = True

    @classmethod
    def make(cls, hw: tuple[int, int], block: tuple[int, int], halo: tuple[int, int] = (0, 0),
             window: tuple[int, int] | None = None, mask_outside: bool = True) -> BlockLayout:
        if window is not None and not all(s % 2 for s in window):
            raise ValueError(f"window sides must be odd, got {window}")
        if mask_outside:
            halo = tuple(0 if -(-n // b) == 1 else e for n, b, e in zip(hw, block, halo))
        return cls(tuple(hw), tuple(block), tuple(halo), window, mask_outside)

    @property
    def count(self) -> tuple[int, int]:
        """Blocks along each axis."""
        return tuple(-(-n // b) for n, b in zip(self.hw, self.block))

    @property
    def keys(self) -> tuple[int, int]:
        """Key block sides ``block + 2 * halo``."""
        return tuple(b + 2 * e for b, e in zip(self.block, self.halo))

    @property
    def grid(self) -> Grid:
        """Query and key positions of one block, for the position term."""
        return Grid(self.block, self.keys, tuple(-e for e in self.halo))

    def axis_mask(self, axis: int) -> np.ndarray:
        """``[count, block, keys]``: key inside the image (if masked) and inside the query's
        window, per block along ``axis``."""
        n, count, block, halo = self.hw[axis], self.count[axis], self.block[axis], self.halo[axis]
        kv = np.arange(block + 2 * halo) - halo  # key position relative to the block start
        position = np.arange(count)[:, None, None] * block + kv  # [count, 1, keys] in the image
        inside = (position >= 0) & (position < n) | (not self.mask_outside)
        if self.window is not None:
            offset = kv[None, :] - np.arange(block)[:, None]
            inside = inside & (np.abs(offset) <= self.window[axis] // 2)
        return np.broadcast_to(inside, (count, block, kv.size))

    def key_positions(self, axis: int) -> np.ndarray:
        """``[count, keys, n]`` one-hot image position of each key of each block (keys
        outside the image are all zero): scatters block weights back onto the map."""
        start = np.arange(self.count[axis])[:, None] * self.block[axis] - self.halo[axis]
        position = start + np.arange(self.keys[axis])[None, :]
        return (position[..., None] == np.arange(self.hw[axis])).astype(np.float32)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    position: LogitTerm | None = None,
    scale: float | None = None,
    row_chunk: int | None = None,
    batch_chunk: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Attention of each query block of ``layout`` to its key block (block plus halo).

    With no halo and no window this is non-overlapping window attention (Twins' LSA,
    MaxViT's block attention, the SASA stem). With ``halo = k // 2`` and ``window = k`` it
    is exact k x k neighbourhood attention (SASA); with a halo and no window, HaloNet.
    Maps that are not a multiple of the block are padded; padded queries are dropped.

    Args:
      q, k: ``[B, H, W, heads, d]`` queries (unscaled) and keys.
      v: ``[B, H, W, heads, dv]`` values.
      layout: the blocks (:meth:`BlockLayout.make`, for the map ``(H, W)``).
      position: logit term for one block, ``position(q_block)`` with unscaled ``q_block
        [..., bh*bw, heads, d]``, broadcasting to ``[..., heads, bh*bw, kh*kw]`` for
        ``layout.grid`` (the same for every block).
      scale: logit scale for ``q . k``; defaults to ``1 / sqrt(d)``.
      row_chunk: if set, rows of blocks are processed ``row_chunk`` at a time in a
        sequential loop whose body is rematerialised in the backward pass, so the logits
        of only that many block rows are ever alive (forward and backward). None
        processes every block at once (fastest, most memory).
      batch_chunk: with ``row_chunk``, images per sequential step as well (the largest
        divisor of B not above it; None = all): the logits alive at a time shrink in
        proportion, the result does not change.
      dropout_rate, dropout_rng: dropout on the attention weights (an independent mask
        per step).
      return_weights: also return the softmax weights ``[nh, B, nw, heads, bh*bw, kh*kw]``
        (:func:`dense_block_weights` scatters them onto the map).

    Returns:
      ``[B, H, W, heads, dv]`` in the dtype of ``v``, and the weights or None.
    """
    if q.ndim != 5 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "blocked_attention expects q, k of shape [B, H, W, heads, d] and v of shape "
            f"[B, H, W, heads, dv]; got {q.shape}, {k.shape}, {v.shape}"
        )
    return _blocked_attention((q, k, v), layout, position=position, scale=scale,
                              row_chunk=row_chunk, batch_chunk=batch_chunk,
                              dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng, return_weights=return_weights)


def unpack_planes(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]`` of a packed ``qkv [...,
    3, heads, d]``, as one split: its gradient is one concatenation of the three, where
    three index slices have three zero-padded gradients summed (XLA:CPU wrote each pad, fused
    with its transpose, over the whole packed map)."""
    return tuple(t[..., 0, :, :] for t in jnp.split(qkv, 3, axis=-3))


def blocked_attention_packed(qkv: jax.Array, layout: BlockLayout,
                             **kwargs: Any) -> tuple[jax.Array, jax.Array | None]:
    """:func:`blocked_attention` of ``q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :],
    qkv[..., 2, :, :]`` for a packed ``qkv [B, H, W, 3, heads, d]`` (the fused projection's
    output, reshaped: a free bitcast).

    Same result; less memory when keys outside the image are masked
    (``layout.mask_outside``): each block row reads its queries, keys and values straight
    from ``qkv``, so no separate q, k and v copies (3x the map, kept for the backward pass)
    are made. Otherwise it splits ``qkv`` and calls :func:`blocked_attention`.
    """
    if qkv.ndim != 6 or qkv.shape[3] != 3:
        raise ValueError(f"blocked_attention_packed expects qkv [B, H, W, 3, heads, d], got "
                         f"{qkv.shape}")
    if not layout.mask_outside:
        return blocked_attention(*unpack_planes(qkv), layout, **kwargs)
    return _blocked_attention(qkv, layout, **kwargs)


def _blocked_attention(
    source: jax.Array | tuple[jax.Array, jax.Array, jax.Array],
    layout: BlockLayout,
    *,
    position: LogitTerm | None = None,
    scale: float | None = None,
    row_chunk: int | None = None,
    batch_chunk: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """:func:`blocked_attention` of ``source``: a ``(q, k, v)`` tuple or a packed ``qkv``
    ``[B, H, W, 3, heads, d]`` (only with ``layout.mask_outside``)."""
    packed = not isinstance(source, tuple)
    q = source if packed else source[0]
    b, h, w = q.shape[:3]
    heads, d = q.shape[-2:]
    dv = d if packed else source[2].shape[-1]
    if (h, w) != layout.hw:
        raise ValueError(f"layout is for a {layout.hw} map, got queries {q.shape}")
    if row_chunk is not None and row_chunk < 1:
        raise ValueError(f"row_chunk must be None or a positive number of rows, got {row_chunk}")
    if batch_chunk is not None and batch_chunk < 1:
        raise ValueError(f"batch_chunk must be None or a positive number of images, got "
                         f"{batch_chunk}")
    (bh, bw), (hh, hw), (nh, nw), (kh, kw) = layout.block, layout.halo, layout.count, layout.keys
    hp, wp = nh * bh, nw * bw
    scale = d**-0.5 if scale is None else scale
    rows, cols = layout.axis_mask(0), layout.axis_mask(1)
    masked = not (rows.all() and cols.all())
    # Keys outside the image are masked out, so their content does not matter: a block row
    # reads its queries, key rows and key columns straight from the unpadded map at clamped
    # indices (border pixels repeated under the mask; queries past the map are dropped), so
    # no halo-padded copy of k and v (1.2x the map each for SASA at 56x56) exists, in the
    # forward pass or as a cotangent in the backward. Zero keys that take part in the
    # softmax (``mask_outside=False``) are padded instead.
    clamp = layout.mask_outside
    if not clamp:
        q, k, v = source
        q = jnp.pad(q, ((0, 0), (0, hp - h), (0, wp - w), (0, 0), (0, 0)))
        k, v = (jnp.pad(t, ((0, 0), (hh, hp - h + hh), (hw, wp - w + hw), (0, 0), (0, 0)))
                for t in (k, v))
    key_cols = np.clip(np.arange(nw)[:, None] * bw - hw + np.arange(kw)[None, :], 0, w - 1)
    query_cols = np.minimum(np.arange(wp), w - 1)

    looped = row_chunk is not None and row_chunk < nh
    bc = b if batch_chunk is None or not looped else math.gcd(b, min(batch_chunk, b))
    nb = b // bc  # sequential steps per block row
    # Non-overlapping windows that tile the map (Twins' LSA at 224, MaxViT's blocks): a
    # block row is a plain reshape of the map, so the steps read their rows from one
    # transposed copy instead of gathering (whose gradient is a scatter-add: slow to
    # compile and to run on XLA:CPU). Same steps, same result.
    tiled = (hh, hw) == (0, 0) and (hp, wp) == (h, w)
    plain = (position is None and not masked and not return_weights and dv == d
             and (dropout_rate == 0.0 or dropout_rng is None))
    if tiled and plain and not looped:
        return _tiled_window_attention(source, layout, scale), None
    if tiled:
        def by_step(t: jax.Array) -> jax.Array:
            """``[B, H, ...] -> [nh * nb, bc, bh, ...]``, step ``i = n * nb + c``."""
            t = t.reshape(nb, bc, nh, bh, *t.shape[2:])
            return jnp.swapaxes(t, 0, 2).swapaxes(1, 2).reshape(nh * nb, bc, bh, *t.shape[4:])
        step_rows = by_step(source) if packed else tuple(map(by_step, source))

    def gather(t: jax.Array, c: jax.Array, row_index: jax.Array, col_index: np.ndarray,
               *plane: Any) -> jax.Array:
        """``t[images of step c][:, row_index][:, :, col_index]`` (and ``[..., plane, :, :]``
        of a packed ``t``) in one gather, indices in range. Slicing the images or the planes
        first would cost a map-sized copy (hoisted out of the loop) or cotangent."""
        index = [c * bc + jnp.arange(bc), row_index, col_index, *map(np.asarray, plane)]
        ndims = [np.ndim(i) for i in index]
        index = [jnp.reshape(i, jnp.shape(i) + (1,) * sum(ndims[j + 1:]))
                 for j, i in enumerate(index)]
        return t.at[tuple(index)].get(mode="promise_in_bounds")

    def take_queries(n: jax.Array, c: jax.Array) -> jax.Array:
        """``[bc, bh, wp, heads, d]``: query rows ``[n * bh, (n + 1) * bh)``."""
        if not clamp:
            return lax.dynamic_slice(q, (c * bc, n * bh) + (0,) * 3, (bc, bh) + q.shape[2:])
        index = jnp.minimum(n * bh + jnp.arange(bh), h - 1)
        if packed:
            return gather(source, c, index, query_cols, 0)
        return gather(q, c, index, query_cols)

    def take_keys(n: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of block row ``n``, ``[bc, nw, kh * kw, heads, d or dv]``."""
        if clamp:
            index = jnp.clip(n * bh - hh + jnp.arange(kh), 0, h - 1)
            if packed:  # [bc, kh, nw, kw, 2, heads, d]
                t = gather(source, c, index, key_cols, np.array([1, 2]))
                kn, vn = t[..., 0, :, :], t[..., 1, :, :]
            else:
                kn, vn = (gather(t, c, index, key_cols) for t in source[1:])
        else:
            kn, vn = (_unfold(lax.dynamic_slice(t, (c * bc, n * bh) + (0,) * 3,
                                                (bc, kh) + t.shape[2:]), 2, nw, kw, bw)
                      for t in (k, v))
        return tuple(t.transpose(0, 2, 1, 3, 4, 5).reshape(bc, nw, kh * kw, heads, -1)
                     for t in (kn, vn))

    def windows(t: jax.Array) -> jax.Array:
        """``[bc, bh, wp, heads, x] -> [bc, nw, bh * bw, heads, x]``."""
        t = t.reshape(bc, bh, nw, bw, *t.shape[3:]).transpose(0, 2, 1, 3, 4, 5)
        return t.reshape(bc, nw, bh * bw, *t.shape[4:])

    def block_row(i: jax.Array, row: Any = None) -> tuple[jax.Array, jax.Array | None]:
        """Step ``i``: output rows ``[n * bh, (n + 1) * bh)`` of images ``[c * bc, (c + 1) *
        bc)`` for ``n, c = divmod(i, nb)``: ``[bc, bh, wp, heads, dv]``. ``row``: the
        step's rows of the source when the blocks tile the map."""
        n, c = (i, 0) if nb == 1 else (i // nb, i % nb)
        if tiled:
            planes = (row[..., 0, :, :], row[..., 1, :, :], row[..., 2, :, :]) if packed else row
            qn, kn, vn = map(windows, planes)
        else:
            qn = windows(take_queries(n, c))
            kn, vn = take_keys(n, c)
        mask = None
        if masked:
            row_mask = jnp.asarray(rows)[n][None, :, None, :, None]
            mask = row_mask & jnp.asarray(cols)[:, None, :, None, :]
            mask = mask.reshape(nw, 1, bh * bw, kh * kw)  # [nw, heads, queries, keys]
        bias = position(qn) if position is not None else None
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        out, weights = dot_product_attention(
            qn * jnp.asarray(scale, qn.dtype), kn, vn, bias=bias, mask=mask,
            dropout_rate=dropout_rate, dropout_rng=rng,
        )
        out = out.reshape(bc, nw, bh, bw, heads, dv).transpose(0, 2, 1, 3, 4, 5)
        return out.reshape(bc, bh, wp, heads, dv), (weights if return_weights else None)

    index = jnp.arange(nh * nb)
    steps = (index, step_rows) if tiled else (index,)
    if not looped:
        out, weights = jax.vmap(block_row)(*steps)
    else:
        batch = row_chunk * nb if row_chunk > 1 else None  # None: no vmap inside the loop
        out, weights = lax.map(lambda a: jax.checkpoint(block_row)(*a), steps,
                               batch_size=batch)
    # [nh * nb, bc, ...] -> [nh, B, ...]
    out = out.reshape(nh, b, bh, wp, heads, dv)
    if weights is not None:
        weights = weights.reshape(nh, b, *weights.shape[2:])
    return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, hp, wp, heads, dv)[:, :h, :w], weights


def _tiled_window_attention(source: jax.Array | tuple[jax.Array, jax.Array, jax.Array],
                            layout: BlockLayout, scale: float) -> jax.Array:
    """Plain attention within non-overlapping windows that tile the map (no halo, mask,
    position term or dropout: Twins' LSA at 224), for a packed ``qkv [B, H, W, 3, heads, d]``
    or a ``(q, k, v)`` tuple: one transpose of ``qkv`` to head-major windows, then
    :func:`stacked_attention`, whose gradient comes back stacked and is transposed back once.

    Against the stepwise path (per-plane slices and transposes, autodiff of the softmax),
    compiled both ways in one process and alternated, batch 8, 224x224, float32, 2-core
    Xeon: Twins-SVT-S's train step 1613 -> 1586 and 1600 -> 1576 ms at one thread (two
    runs), 882 -> 866 and 942 -> 925 ms at two; its forward pass 414 -> 410 / 249 -> 245 ms.
    """
    qkv = source if not isinstance(source, tuple) else jnp.stack(source, axis=3)
    b, h, w, _, heads, d = qkv.shape
    (bh, bw), (nh, nw) = layout.block, layout.count
    t = qkv.reshape(b, nh, bh, nw, bw, 3, heads, d).transpose(5, 0, 1, 3, 6, 2, 4, 7)
    out = stacked_attention(t.reshape(3, b * nh * nw, heads, bh * bw, d), scale)
    out = out.reshape(b, nh, nw, heads, bh, bw, d).transpose(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, h, w, heads, d)


def dense_block_weights(weights: jax.Array, layout: BlockLayout) -> jax.Array:
    """Block weights ``[nh, B, nw, heads, bh*bw, kh*kw]`` (from :func:`blocked_attention`) as
    a dense ``[B, heads, H, W, H, W]`` array over (query, key) image positions; keys outside
    a query's key block get 0, keys outside the image are dropped."""
    (nh, nw), (bh, bw), (kh, kw), (h, w) = layout.count, layout.block, layout.keys, layout.hw
    weights = weights.reshape(nh, -1, nw, weights.shape[3], bh, bw, kh, kw)
    dense = jnp.einsum("nbmhijac,nay,mcx->bhnimjyx", weights, layout.key_positions(0),
                       layout.key_positions(1))
    dense = dense.reshape(*dense.shape[:2], nh * bh, nw * bw, h, w)
    return dense[:, :, :h, :w]


def _unfold(t: jax.Array, axis: int, count: int, size: int, stride: int) -> jax.Array:
    """``count`` windows of ``size`` along ``axis`` at ``stride``: [..., count, size, ...]."""
    if size == stride:
        return t.reshape(t.shape[:axis] + (count, size) + t.shape[axis + 1:])
    index = np.arange(count)[:, None] * stride + np.arange(size)[None, :]
    return jnp.take(t, index, axis=axis)
