"""Pieces shared by the Pallas kernels: the online-softmax step in base 2, the final normalisation, padding
to tiles, and the per-tile summaries that let the ring kernel skip key tiles no query of a tile may see."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity" for masked scores: -inf - -inf would be NaN inside the running maximum.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_BIG = int(np.iinfo(np.int32).max)


def pow2_at_least(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum) (Triton tiles are powers of two, matmuls >= 16)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def check_heads(heads: int, kv_heads: int, dim: int) -> None:
    """The shapes both kernels take: query heads a multiple of the K/V heads, a power-of-two head dim >= 16."""
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of the key/value heads ({kv_heads})")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"the Pallas kernels need a power-of-two head dim >= 16, got {dim}")


def pad_to(x: jnp.ndarray, multiple: int, value: int | float = 0, axis: int = 0) -> jnp.ndarray:
    """Pad axis `axis` of x with `value` up to a multiple of `multiple` (no copy when it already is)."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def matmul(a: jnp.ndarray, b: jnp.ndarray, trans_b: bool = False, precision=None) -> jnp.ndarray:
    """a [M, K] @ b [K, N] (or b [N, K] transposed) accumulated in float32, as a tile matmul in a kernel."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def online_update(carry, s, mask=None):
    """Fold a tile of base-2 scores s [R, K] (visible where mask; everywhere without one) into the running
    (out, max, sum).

    Returns the rescaled output accumulator, the new max and sum, and the tile's probabilities (0 where
    masked) for the caller to multiply by V. Rows that have seen no key keep sum 0.
    """
    o, m, l_sum = carry
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return o * correction[:, None], m_new, l_sum * correction + p.sum(axis=-1), p


def finish_rows(o, m, l_sum):
    """Normalise the accumulators: (out, natural-log lse); a row that saw no key gets 0 and -inf."""
    has = l_sum > 0
    safe = jnp.where(has, l_sum, 1.0)
    lse = jnp.where(has, (m + jnp.log2(safe)) * math.log(2.0), -jnp.inf)
    return o / safe[:, None], lse


def tile_summaries(
    q_pos: jnp.ndarray, q_seg: jnp.ndarray, k_pos: jnp.ndarray, k_seg: jnp.ndarray, bq: int, bk: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per query tile [7, nq]: the interval [first, end) of key tiles it may see, its highest position, its
    segment range (padding excluded), and the run [w_first, w_end) of key tiles it sees whole; per key tile
    [3, nk]: lowest position and segment range.

    A key tile may be seen by a query tile when some key is at or before the tile's last query position and
    their segment ranges overlap; tiles outside the interval, or inside it but not visible, are skipped. A
    key tile that every query of the tile sees whole (one request, every key at or before the lowest query
    position) needs no mask: the kernel runs those in a loop of their own, with no branch in it.
    """
    qp, qs = q_pos.reshape(-1, bq), q_seg.reshape(-1, bq)
    kp, ks = k_pos.reshape(-1, bk), k_seg.reshape(-1, bk)
    q_max, q_min = jnp.where(qs >= 0, qp, -1).max(axis=1), jnp.where(qs >= 0, qp, _BIG).min(axis=1)
    q_lo, q_hi = jnp.where(qs >= 0, qs, _BIG).min(axis=1), qs.max(axis=1)
    k_min, k_max = jnp.where(ks >= 0, kp, _BIG).min(axis=1), jnp.where(ks >= 0, kp, -1).max(axis=1)
    k_lo, k_hi = jnp.where(ks >= 0, ks, _BIG).min(axis=1), ks.max(axis=1)
    q_one = (qs.min(axis=1) == q_hi) & (q_hi >= 0)
    k_one = (ks.min(axis=1) == k_hi) & (k_hi >= 0)
    may = (k_min[None, :] <= q_max[:, None]) & (k_lo[None, :] <= q_hi[:, None]) & (k_hi[None, :] >= q_lo[:, None])
    nk = may.shape[1]
    any_ = may.any(axis=1)
    first = jnp.where(any_, jnp.argmax(may, axis=1), 0)
    end = jnp.where(any_, nk - jnp.argmax(may[:, ::-1], axis=1), 0)
    # the key tiles the query tile sees whole, when they are one run [w_first, w_end) (else none: all masked)
    whole = q_one[:, None] & k_one[None, :] & (q_lo[:, None] == k_lo[None, :]) & (k_max[None, :] <= q_min[:, None])
    w_any = whole.any(axis=1)
    w_first = jnp.where(w_any, jnp.argmax(whole, axis=1), 0)
    w_end = jnp.where(w_any, nk - jnp.argmax(whole[:, ::-1], axis=1), 0)
    one_run = whole.sum(axis=1) == w_end - w_first
    w_first, w_end = jnp.where(one_run, w_first, 0), jnp.where(one_run, w_end, 0)
    qsum = jnp.stack([first, end, q_max, q_lo, q_hi, w_first, w_end]).astype(jnp.int32)
    ksum = jnp.stack([k_min, k_lo, k_hi]).astype(jnp.int32)
    return qsum, ksum
