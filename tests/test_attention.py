"""The blockwise attention primitives against a full-matrix reference, and the exact merge rule."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import held_case, naive_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import block_attention, held_attention, merge_attention, paged_decode_attention


def _packed(rng, lengths, pad_to, heads, kv_heads, dim):
    t = pad_to
    seg = np.full(t, -1, np.int32)
    pos = np.zeros(t, np.int32)
    at = 0
    for i, n in enumerate(lengths):
        seg[at : at + n] = i
        pos[at : at + n] = np.arange(n)
        at += n
    q = rng.standard_normal((t, heads, dim)).astype(np.float32)
    k = rng.standard_normal((t, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((t, kv_heads, dim)).astype(np.float32)
    return q, k, v, pos, seg


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("lengths,pad_to,block", [([100], 128, 32), ([5, 60, 1, 30], 128, 32), ([200, 56], 256, 64)])
def test_block_attention_matches_full_matrix(heads, kv_heads, lengths, pad_to, block):
    rng = np.random.default_rng(len(lengths) + heads)
    q, k, v, pos, seg = _packed(rng, lengths, pad_to, heads, kv_heads, 16)
    out, lse = block_attention(q, k, v, pos, seg, pos, seg, block_q=block, block_k=block)
    ref_out, ref_lse = naive_attention(q, k, v, pos, seg, pos, seg)
    valid = seg >= 0
    np.testing.assert_allclose(np.asarray(out)[valid], ref_out[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse)[valid], ref_lse[valid], atol=2e-5)
    assert np.all(np.asarray(out)[~valid] == 0) and np.all(np.isneginf(np.asarray(lse)[~valid]))


def test_merge_of_disjoint_key_sets_equals_full_attention():
    """Splitting keys into strided halves (as a 2-rank ring does) and merging is exact."""
    rng = np.random.default_rng(1)
    q, k, v, pos, seg = _packed(rng, [50, 30], 96, 4, 2, 8)
    full, full_lse = naive_attention(q, k, v, pos, seg, pos, seg)
    parts = []
    for r in range(2):
        idx = np.arange(r, 96, 2)
        parts.append(block_attention(q, k[idx], v[idx], pos, seg, pos[idx], seg[idx], block_q=32, block_k=16))
    out, lse = merge_attention(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    valid = seg >= 0
    np.testing.assert_allclose(np.asarray(out)[valid], full[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse)[valid], full_lse[valid], atol=2e-5)


def test_merge_with_empty_partial_is_identity():
    o = jnp.ones((3, 2, 4))
    lse = jnp.zeros((3, 2))
    empty_o, empty_lse = jnp.zeros((3, 2, 4)), jnp.full((3, 2), -jnp.inf)
    out, out_lse = merge_attention(empty_o, empty_lse, o, lse)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(o))
    both_empty, both_lse = merge_attention(empty_o, empty_lse, empty_o, empty_lse)
    assert not np.isnan(np.asarray(both_empty)).any() and np.isneginf(np.asarray(both_lse)).all()


def _paged_case(rng, lengths, page_size, width, heads, kv_heads, dim, layers=2):
    num_pages = width * len(lengths) + 3
    k_pool = rng.standard_normal((layers, kv_heads, num_pages * page_size, dim)).astype(np.float32)
    v_pool = rng.standard_normal((layers, kv_heads, num_pages * page_size, dim)).astype(np.float32)
    perm = rng.permutation(num_pages)
    table = np.zeros((len(lengths), width), np.int32)
    for b in range(len(lengths)):
        table[b] = perm[b * width : (b + 1) * width]
    q = rng.standard_normal((len(lengths), heads, dim)).astype(np.float32)
    return q, k_pool, v_pool, table


@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    page_size=st.sampled_from([1, 4, 16]),
    group=st.sampled_from([1, 3]),
    layer=st.integers(0, 1),
)
@settings(max_examples=25, deadline=None)
def test_paged_decode_attention_matches_gathered_reference(lengths, page_size, group, layer):
    rng = np.random.default_rng(sum(lengths) + page_size)
    width = 16 * (-(-max(max(lengths), 1) // (16 * page_size)))
    q, k_pool, v_pool, table = _paged_case(rng, lengths, page_size, width, 2 * group, 2, 8)
    out, lse = paged_decode_attention(
        q, k_pool, v_pool, jnp.int32(layer), table, np.array(lengths, np.int32), page_size=page_size
    )
    for b, n in enumerate(lengths):
        if n == 0:
            assert np.isneginf(np.asarray(lse)[b]).all() and np.all(np.asarray(out)[b] == 0)
            continue
        slots = (table[b][:, None] * page_size + np.arange(page_size)[None, :]).reshape(-1)[:n]
        kk, vv = k_pool[layer][:, slots].swapaxes(0, 1), v_pool[layer][:, slots].swapaxes(0, 1)
        ref, ref_lse = naive_attention(
            q[b : b + 1], kk, vv, np.array([n]), np.zeros(1, np.int32), np.arange(n), np.zeros(n, np.int32)
        )
        np.testing.assert_allclose(np.asarray(out)[b], ref[0], atol=3e-5)
        np.testing.assert_allclose(np.asarray(lse)[b], ref_lse[0], atol=3e-5)


@pytest.mark.parametrize("held", [[40, 0, 700], [0, 0, 0], [513]])
def test_held_attention_matches_full_matrix(held):
    """Queries against the K/V their requests hold in a pool (an appending prefill): each sees every held key
    of its own request (none of another's, none listed past the count), over several gather blocks."""
    args, want = held_case(np.random.default_rng(len(held)), held, [9, 20, 3])
    q, q_seg, k_pool, v_pool, slots, k_seg, count = args
    for layer, (ref, ref_lse) in want.items():
        out, lse = held_attention(q, q_seg, k_pool, v_pool, jnp.int32(layer), slots, k_seg, count)
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(ref_lse))
        fin = np.isfinite(ref_lse)
        np.testing.assert_allclose(np.asarray(lse)[fin], ref_lse[fin], atol=3e-5)
        np.testing.assert_allclose(np.asarray(out), np.where(fin[..., None], ref, 0), atol=3e-5)
