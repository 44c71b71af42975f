"""Paged decode attention as a Pallas kernel (Triton lowering): one query token per request over its pages.

Same contract as `reference.paged_decode_attention`: the head-major pool [L, KV, slots, D] is read at a
layer without slicing it out (the kernel sees it as rows of one flat [L * KV * slots, D] view and gathers
the slots of each request's pages), lengths are ragged (0 allowed: output 0, lse -inf).

One program per (request, KV head, key split): the query heads of one KV head are processed together as the
rows of one matmul (padded to 16), and long contexts are split over the key axis so that a small batch
still fills the GPU; the splits' (output, lse) partials are merged exactly afterwards.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import merge_attention_many
from pallas_kernels.tiles import MASK_VALUE, check_heads, finish_rows, matmul, online_update, pow2_at_least

BLOCK_K = 64  # keys per loop step
TARGET_PROGRAMS = 512  # split long contexts until about this many programs run (an H100 has 132 SMs)
MIN_SPLIT_TOKENS = 512  # but never split into pieces shorter than this


def _decode_kernel(
    layer_ref,  # [1] int32
    len_ref,  # [B] int32
    q_ref,  # [Gp, D]
    pt_ref,  # [W] int32 page ids of this request
    k_ref,  # [L * KV * slots, D]
    v_ref,
    o_ref,  # [Gp, D] float32
    lse_ref,  # [Gp] float32
    *,
    kv_heads: int,
    num_slots: int,
    page_size: int,
    split_tokens: int,
    block_k: int,
    scale_log2: float,
    precision,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    start = split * split_tokens
    n = jnp.clip(length - start, 0, split_tokens)
    base = (layer_ref[0] * kv_heads + h) * num_slots
    q = q_ref[...]
    rows_q, d = q.shape

    def visit(j, carry):
        tok = start + j * block_k + jnp.arange(block_k)
        valid = tok < length
        page = pt_ref[jnp.where(valid, tok // page_size, 0)]
        rows = jnp.where(valid, base + page * page_size + tok % page_size, base)
        k = k_ref[rows, :]
        s = matmul(q, k, trans_b=True, precision=precision) * scale_log2
        o, m, l_sum, p = online_update(carry, s, valid[None, :])
        v = v_ref[rows, :]
        return o + matmul(p.astype(v.dtype), v, precision=precision), m, l_sum

    init = (
        jnp.zeros((rows_q, d), jnp.float32),
        jnp.full((rows_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows_q,), jnp.float32),
    )
    o, m, l_sum = jax.lax.fori_loop(0, pl.cdiv(n, block_k), visit, init)
    out, lse = finish_rows(o, m, l_sum)
    o_ref[...] = out
    lse_ref[...] = lse


def split_tokens_for(batch: int, kv_heads: int, table_tokens: int, block_k: int = BLOCK_K) -> int:
    """Keys per split: enough splits for about TARGET_PROGRAMS programs, none shorter than MIN_SPLIT_TOKENS."""
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    tokens = max(MIN_SPLIT_TOKENS, -(-table_tokens // want))
    tokens = -(-tokens // block_k) * block_k
    return min(tokens, -(-table_tokens // block_k) * block_k)


@functools.partial(
    jax.jit, static_argnames=("page_size", "block_k", "interpret", "num_warps", "num_stages", "split_tokens")
)
def paged_decode_attention(
    q: jnp.ndarray,
    k_pool: jnp.ndarray,
    v_pool: jnp.ndarray,
    layer: jnp.ndarray,
    page_table: jnp.ndarray,
    lengths: jnp.ndarray,
    *,
    page_size: int,
    block_k: int = BLOCK_K,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    split_tokens: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """q [B, H, D] against the pool [L, KV, slots, D] at `layer`, pages page_table [B, W], lengths [B].

    Returns (out [B, H, D] in q's dtype, lse [B, H] float32).
    """
    b, h, d = q.shape
    layers, kvh, num_slots, _ = k_pool.shape
    check_heads(h, kvh, d)
    g = h // kvh
    gp = pow2_at_least(g)
    width = page_table.shape[1]
    split = split_tokens or split_tokens_for(b, kvh, width * page_size, block_k)
    splits = -(-(width * page_size) // split)
    qg = jnp.pad(q.reshape(b, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    flat_k = k_pool.reshape(layers * kvh * num_slots, d)
    flat_v = v_pool.reshape(layers * kvh * num_slots, d)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _decode_kernel,
        kv_heads=kvh,
        num_slots=num_slots,
        page_size=page_size,
        split_tokens=split,
        block_k=block_k,
        scale_log2=math.log2(math.e) / math.sqrt(d),
        precision=precision,
    )
    rows = flat_k.shape[0]
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, s: (0,)),
            pl.BlockSpec((b,), lambda i, j, s: (0,)),
            pl.BlockSpec((None, None, gp, d), lambda i, j, s: (i, j, 0, 0)),
            pl.BlockSpec((None, width), lambda i, j, s: (i, 0)),
            pl.BlockSpec((rows, d), lambda i, j, s: (0, 0)),
            pl.BlockSpec((rows, d), lambda i, j, s: (0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, j, s: (s, i, j, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, s: (s, i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, kvh, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), lengths.astype(jnp.int32), qg, page_table, flat_k, flat_v)
    out, lse = merge_attention_many(o, lse) if splits > 1 else (o[0], lse[0])  # exact merge of the splits
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype), lse[:, :, :g].reshape(b, h)
