"""Ring-step prefill attention as a Pallas kernel (Triton lowering): packed queries against one K/V block.

Same contract as `reference.block_attention`: a key is visible to a query when both belong to the same
request (segment id >= 0) and the key's position is <= the query's; the result is the normalised output and
its natural-log log-sum-exp, with output 0 and lse -inf for a row that saw no key.

One program per (query tile, query head); the K/V head is the query head's GQA group. Key tiles that no
query of the tile may see (other requests, or only later positions) are skipped, not masked: the loop runs
over the interval of tiles that may be visible and each tile is checked against its summary (lowest
position, segment range) before any load. The tiles a query tile sees whole (one request, all keys at or
before its first query) run first in a loop with no branch and no mask, which Triton pipelines; only the
edge tiles are masked. Memory is O(tile): no [T, S] score matrix exists.

`held_attention` runs the same kernel on K/V an appending prefill's requests already hold in a pool: the
keys are read through a list of pool rows (one gather per tile, as the paged decode kernel reads pages),
positions play no part (every held key precedes every query), and the tiles past the listed keys or of other
requests are skipped on the device, so the program's shapes need not follow how much is held.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tiles import (
    MASK_VALUE,
    check_heads,
    finish_rows,
    matmul,
    online_update,
    pad_to,
    pow2_at_least,
    tile_summaries,
)

# Tile sizes for the Triton lowering: matmul operands need every dimension >= 16 and a power of two. On an
# H200 at head dim 128, 128 x 128 tiles with 8 warps and 3 stages were fastest for long prompts (459 TFLOP/s
# on a 32K causal request against 372 for 64 x 64); 64 x 64 was 6% faster for packed short prompts.
BLOCK_Q = 128
BLOCK_K = 128


def _ring_kernel(
    qsum_ref,  # [7, nq] int32 per query tile (see tile_summaries)
    ksum_ref,  # [3, nk] int32 per key tile
    q_ref,  # [bq, D]
    k_ref,  # [S, D]
    v_ref,  # [S, D]
    qpos_ref,  # [bq]
    qseg_ref,  # [bq]
    kpos_ref,  # [S]
    kseg_ref,  # [S]
    *refs,  # held_attention: the pool row of each key [S]; then out [bq, D] and lse [bq]
    block_k: int,
    scale_log2: float,
    precision,
):
    *rows_ref, o_ref, lse_ref = refs
    i = pl.program_id(0)
    q = q_ref[...]
    lo, hi, q_max, q_lo, q_hi, w_first, w_end = (qsum_ref[r, i] for r in range(7))
    bq, d = q.shape

    def attend(j, carry, masked: bool):
        keys = pl.ds(j * block_k, block_k)
        rows = rows_ref[0][keys] if rows_ref else keys  # held keys: gathered from the pool's rows
        s = matmul(q, k_ref[rows, :], trans_b=True, precision=precision) * scale_log2
        mask = None
        if masked:
            qp, qs, kp, ks = qpos_ref[...], qseg_ref[...], kpos_ref[keys], kseg_ref[keys]
            mask = (qs[:, None] == ks[None, :]) & (qs[:, None] >= 0) & (kp[None, :] <= qp[:, None])
        o, m, l_sum, p = online_update(carry, s, mask)
        v = v_ref[rows, :]
        return o + matmul(p.astype(v.dtype), v, precision=precision), m, l_sum

    def visit_edge(j, carry):  # a tile outside the whole run: skipped unless some query may see it
        may_see = (ksum_ref[0, j] <= q_max) & (ksum_ref[1, j] <= q_hi) & (ksum_ref[2, j] >= q_lo)
        may_see &= (j < w_first) | (j >= w_end)
        return jax.lax.cond(may_see, lambda c: attend(j, c, True), lambda c: c, carry)

    init = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = jax.lax.fori_loop(w_first, w_end, lambda j, c: attend(j, c, False), init)  # no branch: pipelined
    o, m, l_sum = jax.lax.fori_loop(lo, hi, visit_edge, carry)
    out, lse = finish_rows(o, m, l_sum)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


TUNING = ("block_q", "block_k", "interpret", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=TUNING)
def block_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    q_pos: jnp.ndarray,
    q_seg: jnp.ndarray,
    k_pos: jnp.ndarray,
    k_seg: jnp.ndarray,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal, request-masked attention of packed queries q [T, H, D] against keys k, v [S, KV, D].

    *_pos / *_seg are [T] / [S] int32 (segment -1: padding). Returns (out [T, H, D] in q's dtype, lse [T, H]
    float32). Token counts need not be multiples of the tiles: they are padded here with segment -1.
    """
    s, kvh, d = k.shape
    bk = min(block_k, pow2_at_least(s))
    k, v, k_pos, k_seg = pad_to(k, bk), pad_to(v, bk), pad_to(k_pos, bk), pad_to(k_seg, bk, -1)
    sp, g = k.shape[0], q.shape[1] // kvh
    keys = [pl.BlockSpec((sp, None, d), lambda i, j: (0, j // g, 0))] * 2
    tuning = dict(block_q=block_q, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    return _call(q, q_pos, q_seg, (k, v), keys, k_pos, k_seg, None, kvh, bk, **tuning)


@functools.partial(jax.jit, static_argnames=TUNING)
def held_attention(
    q: jnp.ndarray,
    q_seg: jnp.ndarray,
    k_pool: jnp.ndarray,
    v_pool: jnp.ndarray,
    layer: jnp.ndarray,
    slots: jnp.ndarray,
    k_seg: jnp.ndarray,
    count: jnp.ndarray,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Same contract as `reference.held_attention`: packed queries against the first `count` keys listed by
    slot in the pool [L, KV, num_slots, D] at `layer` (request ids k_seg, -1: padding), no causal mask."""
    layers, kvh, num_slots, d = k_pool.shape
    s = slots.shape[0]
    bk = min(block_k, pow2_at_least(s))
    listed = (jnp.arange(s) < count) & (slots < num_slots) & (k_seg >= 0)
    k_seg = pad_to(jnp.where(listed, k_seg, -1), bk, -1)
    rows = (layer * kvh + jnp.arange(kvh))[:, None] * num_slots + jnp.where(listed, slots, 0)[None, :]
    rows = pad_to(rows.astype(jnp.int32), bk, 0, axis=1)  # [KV, S]: each key's row of the flat pool, per head
    sp, flat, g = rows.shape[1], layers * kvh * num_slots, q.shape[1] // kvh
    pools = (k_pool.reshape(flat, d), v_pool.reshape(flat, d))
    keys = [pl.BlockSpec((flat, d), lambda i, j: (0, 0))] * 2
    rows_spec = pl.BlockSpec((None, sp), lambda i, j: (j // g, 0))
    zeros = jnp.zeros((sp,), jnp.int32)
    tuning = dict(block_q=block_q, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    return _call(q, jnp.zeros_like(q_seg), q_seg, pools, keys, zeros, k_seg, (rows, rows_spec), kvh, bk, **tuning)


def _call(q, q_pos, q_seg, kv, kv_specs, k_pos, k_seg, rows, kvh, bk, *, block_q, interpret, num_warps, num_stages):
    """The kernel over (query tile, query head) programs; keys already padded to tiles of bk, read directly
    or (rows: the pool rows and their spec) gathered."""
    t, h, d = q.shape
    check_heads(h, kvh, d)
    bq = min(block_q, pow2_at_least(t))
    q, q_pos, q_seg = pad_to(q, bq), pad_to(q_pos, bq), pad_to(q_seg, bq, -1)
    tp, sp = q.shape[0], k_seg.shape[0]
    qsum, ksum = tile_summaries(q_pos, q_seg, k_pos, k_seg, bq, bk)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _ring_kernel, block_k=bk, scale_log2=math.log2(math.e) / math.sqrt(d), precision=precision
    )
    extra, extra_specs = ((rows[0],), [rows[1]]) if rows is not None else ((), [])
    out, lse = pl.pallas_call(
        kernel,
        grid=(tp // bq, h),
        in_specs=[
            pl.BlockSpec(qsum.shape, lambda i, j: (0, 0)),
            pl.BlockSpec(ksum.shape, lambda i, j: (0, 0)),
            pl.BlockSpec((bq, None, d), lambda i, j: (i, j, 0)),
            *kv_specs,
            pl.BlockSpec((bq,), lambda i, j: (i,)),
            pl.BlockSpec((bq,), lambda i, j: (i,)),
            pl.BlockSpec((sp,), lambda i, j: (0,)),
            pl.BlockSpec((sp,), lambda i, j: (0,)),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((bq, None, d), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, bq), lambda i, j: (j, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((tp, h, d), q.dtype),
            jax.ShapeDtypeStruct((h, tp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages),
        interpret=interpret,
        name="ring_step_attention" if rows is None else "held_attention",
    )(qsum, ksum, q, *kv, q_pos, q_seg, k_pos, k_seg, *extra)
    return out[:t], lse.T[:t]
