"""Blockwise attention in plain XLA: the reference path every backend is tested against.

Three primitives, each returning a normalised output and its log-sum-exp so that partial results over
disjoint key sets merge exactly (ring prefill steps, held K/V, distributed decode partials):

* `block_attention`: queries of a packed token batch against a block of keys, masked by request id and
  position ("same request and key position <= query position"). Used for prefill, one call per ring step.
* `held_attention`: queries of a packed token batch against the K/V their requests already hold in a pool
  (earlier chunks, a cached prefix), listed by slot. Used by an appending prefill.
* `paged_decode_attention`: one query token per request against that request's keys in a paged pool.

Neither materialises a full score matrix: keys are visited block by block with an online softmax, and
key blocks that no query of a query block may see are skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
# Pages visited per loop step of the decode attention: small blocks waste little on the shorter requests
# of a batch (every row runs as many steps as the longest one).
DECODE_PAGES_PER_BLOCK = 4
HELD_BLOCK = 512  # held keys gathered from the pool per loop step of `held_attention`


def merge_attention_many(o: jnp.ndarray, lse: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Combine n normalised partial attentions o [n, ..., D], lse [n, ...] over disjoint key sets.

    A partial with lse = -inf (it saw no key) contributes nothing; if none saw a key the result is 0, -inf.
    """
    m = lse.max(axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m_safe), 0.0)
    denom = w.sum(axis=0)
    has = denom > 0
    out = (o.astype(jnp.float32) * w[..., None]).sum(axis=0) / jnp.where(has, denom, 1.0)[..., None]
    return out.astype(o.dtype), jnp.where(has, m_safe + jnp.log(jnp.where(has, denom, 1.0)), NEG_INF)


def merge_attention(
    o1: jnp.ndarray, lse1: jnp.ndarray, o2: jnp.ndarray, lse2: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Combine two normalised partial attentions over disjoint keys (lse = -inf means "no keys")."""
    return merge_attention_many(jnp.stack([o1, o2]), jnp.stack([lse1, lse2]))


def _online_step(carry, scores, valid):
    """Fold one block of scores [..., k] into (max, sum, acc); returns the block's probabilities too."""
    m_prev, l_prev, acc = carry
    scores = jnp.where(valid, scores, NEG_INF)
    m_new = jnp.maximum(m_prev, scores.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(scores - m_safe[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev - m_safe, NEG_INF))
    l_new = l_prev * correction + p.sum(axis=-1)
    return m_new, l_new, acc * correction[..., None], p


def _finish(m, denom, acc):
    """Normalise the running sums; rows that saw no key get output 0 and lse -inf."""
    has = denom > 0
    safe = jnp.where(has, denom, 1.0)
    out = jnp.where(has[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(has, m + jnp.log(safe), NEG_INF)
    return out, lse


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def block_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    q_pos: jnp.ndarray,
    q_seg: jnp.ndarray,
    k_pos: jnp.ndarray,
    k_seg: jnp.ndarray,
    *,
    block_q: int = 256,
    block_k: int = 128,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal, request-masked attention of packed queries against packed keys.

    Key blocks of 128: in a batch of packed short prompts fewer keys of other requests are computed and
    masked (on XLA CPU 20% faster than 256 for 15 prompts of 32-512 tokens, and no slower for one long one).

    q [T, H, D]; k, v [S, KV, D] with H a multiple of KV; *_pos and *_seg [T] / [S] int32. A key is visible
    to a query when both have the same segment id (>= 0) and key position <= query position.
    Returns (out [T, H, D] in q's dtype, lse [T, H] float32).
    """
    t, h, d = q.shape
    s, kvh, _ = k.shape
    g = h // kvh
    bq, bk = min(block_q, t), min(block_k, s)
    if t % bq or s % bk:
        raise ValueError(f"token counts ({t}, {s}) must be multiples of the blocks ({bq}, {bk})")
    nq, nk = t // bq, s // bk
    scale = 1.0 / (d**0.5)

    # Query rows of one KV head are grouped together: [nq, KV, G * bq, D] (one matmul per KV head).
    qb = (q.astype(jnp.float32) * scale).reshape(nq, bq, kvh, g, d).transpose(0, 2, 3, 1, 4)
    qb = qb.reshape(nq, kvh, g * bq, d)
    kb = k.reshape(nk, bk, kvh, d)
    vb = v.reshape(nk, bk, kvh, d)
    qpos_b, qseg_b = q_pos.reshape(nq, bq), q_seg.reshape(nq, bq)
    kpos_b, kseg_b = k_pos.reshape(nk, bk), k_seg.reshape(nk, bk)
    # Per-block summaries for skipping key blocks no query of the query block can see.
    big = jnp.iinfo(jnp.int32).max
    kq_min_pos = jnp.where(kseg_b >= 0, kpos_b, big).min(axis=1)
    k_seg_lo = jnp.where(kseg_b >= 0, kseg_b, big).min(axis=1)
    k_seg_hi = kseg_b.max(axis=1)

    def one_q_block(args):
        qi, qp, qs = args
        q_max_pos = jnp.where(qs >= 0, qp, -1).max()
        q_seg_lo = jnp.where(qs >= 0, qs, big).min()
        q_seg_hi = qs.max()

        def visit(j, carry):
            def compute(carry):
                kj = kb[j].astype(jnp.float32)
                vj = vb[j].astype(jnp.float32)
                scores = jnp.einsum("kqd,ckd->kqc", qi, kj)
                valid = (qs[:, None] == kseg_b[j][None, :]) & (qs[:, None] >= 0)
                valid &= kpos_b[j][None, :] <= qp[:, None]
                valid = jnp.tile(valid, (g, 1))[None]
                m, l_sum, acc, p = _online_step(carry, scores, valid)
                acc = acc + jnp.einsum("kqc,ckd->kqd", p, vj)
                return m, l_sum, acc

            may_see = (kq_min_pos[j] <= q_max_pos) & (k_seg_lo[j] <= q_seg_hi) & (k_seg_hi[j] >= q_seg_lo)
            return jax.lax.cond(may_see, compute, lambda c: c, carry)

        init = (
            jnp.full((kvh, g * bq), NEG_INF, jnp.float32),
            jnp.zeros((kvh, g * bq), jnp.float32),
            jnp.zeros((kvh, g * bq, d), jnp.float32),
        )
        m, l_sum, acc = jax.lax.fori_loop(0, nk, visit, init)
        out, lse = _finish(m, l_sum, acc)
        return out, lse

    out, lse = jax.lax.map(one_q_block, (qb, qpos_b, qseg_b))
    # [nq, KV, G * bq, D] -> [T, H, D]
    out = out.reshape(nq, kvh, g, bq, d).transpose(0, 3, 1, 2, 4).reshape(t, h, d).astype(q.dtype)
    lse = lse.reshape(nq, kvh, g, bq).transpose(0, 3, 1, 2).reshape(t, h)
    return out, lse


def take_slots(pool: jnp.ndarray, layer: jnp.ndarray, slots: jnp.ndarray) -> jnp.ndarray:
    """K or V [N, KV, D] at `slots` [N] of a layer of a pool [L, KV, num_slots, D] (slots past the pool read
    zeros). One gather over the pool seen as rows: slicing the layer out first would copy a whole layer of
    the pool into a temporary (the layer index is traced)."""
    _, kvh, num_slots, d = pool.shape
    rows = (layer * kvh + jnp.arange(kvh))[:, None] * num_slots + slots[None, :]  # [KV, N]
    rows = jnp.where(slots[None, :] < num_slots, rows, pool.size // d)  # out of range: filled with zeros
    return jnp.take(pool.reshape(-1, d), rows, axis=0, mode="fill", fill_value=0).swapaxes(0, 1)


@functools.partial(jax.jit, static_argnames=("block",))
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
    block: int = HELD_BLOCK,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Packed queries q [T, H, D] (request ids q_seg [T]) against K/V their requests already hold: the keys at
    `slots` [S] of the pool [L, KV, num_slots, D] at `layer`, of requests k_seg [S] (-1: padding), the first
    `count` of them listed. Every held key precedes every query, so a query sees all the keys of its request.

    Keys are gathered `block` at a time, as many blocks as `count` needs (a loop whose length is data: on a
    GPU the Pallas kernel runs instead). Returns (out [T, H, D] in q's dtype, lse [T, H] float32)."""
    t, n = q.shape[0], slots.shape[0]
    extra = -n % block
    slots = jnp.pad(slots, (0, extra), constant_values=k_pool.shape[2])
    k_seg = jnp.pad(jnp.where(jnp.arange(n) < count, k_seg, -1), (0, extra), constant_values=-1)
    zeros_q, zeros_k = jnp.zeros((t,), jnp.int32), jnp.zeros((block,), jnp.int32)

    def visit(i, acc):
        s = jax.lax.dynamic_slice_in_dim(slots, i * block, block)
        seg = jax.lax.dynamic_slice_in_dim(k_seg, i * block, block)
        k, v = (take_slots(x, layer, s).astype(q.dtype) for x in (k_pool, v_pool))
        return merge_attention(*acc, *block_attention(q, k, v, zeros_q, q_seg, zeros_k, seg))

    init = (jnp.zeros(q.shape, q.dtype), jnp.full(q.shape[:2], NEG_INF, jnp.float32))
    return jax.lax.fori_loop(0, (count + block - 1) // block, visit, init)


@functools.partial(jax.jit, static_argnames=("page_size", "pages_per_block"))
def paged_decode_attention(
    q: jnp.ndarray,
    k_pool: jnp.ndarray,
    v_pool: jnp.ndarray,
    layer: jnp.ndarray,
    page_table: jnp.ndarray,
    lengths: jnp.ndarray,
    *,
    page_size: int,
    pages_per_block: int = DECODE_PAGES_PER_BLOCK,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Attention of one query per request over that request's tokens in a paged pool.

    q [B, H, D]; k_pool, v_pool [L, KV, num_slots, D] (head-major; slot = page * page_size + offset), read
    at `layer` without slicing the layer out; page_table [B, P] int32 page ids; lengths [B] tokens of each
    request held here (its first `lengths` slots of its pages).
    A request with length 0 gets output 0 and lse -inf. Returns (out [B, H, D], lse [B, H]).

    The head-major layout lets one gather produce the [KV, B, tokens, D] blocks the batched matmuls read,
    with no transposed copy (on XLA CPU the transpose cost more than the attention itself).
    """
    b, h, d = q.shape
    layers, kvh, num_slots, _ = k_pool.shape
    g = h // kvh
    n_pages = page_table.shape[1]
    ppb = min(pages_per_block, n_pages)
    if n_pages % ppb:
        raise ValueError(f"page table width {n_pages} must be a multiple of {ppb}")
    pages_per_head = num_slots // page_size
    block_tokens = ppb * page_size
    kp = k_pool.reshape(layers * kvh * pages_per_head, page_size, d)  # one row per (layer, head, page)
    vp = v_pool.reshape(layers * kvh * pages_per_head, page_size, d)
    head_rows = (layer * kvh + jnp.arange(kvh))[:, None, None] * pages_per_head
    qg = (q.astype(jnp.float32) / (d**0.5)).reshape(b, kvh, g, d).transpose(1, 0, 2, 3)  # [KV, B, G, D]
    n_blocks = (jnp.max(lengths) + block_tokens - 1) // block_tokens

    def body(carry):
        j, state = carry
        rows = head_rows + jax.lax.dynamic_slice_in_dim(page_table, j * ppb, ppb, axis=1)[None]
        kj = kp[rows].reshape(kvh, b, block_tokens, d).astype(jnp.float32)
        vj = vp[rows].reshape(kvh, b, block_tokens, d).astype(jnp.float32)
        scores = jnp.einsum("kbgd,kbtd->kbgt", qg, kj)
        tok = j * block_tokens + jnp.arange(block_tokens)
        valid = (tok[None, :] < lengths[:, None])[None, :, None, :]
        m, l_sum, acc, p = _online_step(state, scores, valid)
        acc = acc + jnp.einsum("kbgt,kbtd->kbgd", p, vj)
        return j + 1, (m, l_sum, acc)

    init = (
        jnp.full((kvh, b, g), NEG_INF, jnp.float32),
        jnp.zeros((kvh, b, g), jnp.float32),
        jnp.zeros((kvh, b, g, d), jnp.float32),
    )
    _, (m, l_sum, acc) = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, (jnp.int32(0), init))
    out, lse = _finish(m, l_sum, acc)
    return out.transpose(1, 0, 2, 3).reshape(b, h, d).astype(q.dtype), lse.transpose(1, 0, 2).reshape(b, h)
