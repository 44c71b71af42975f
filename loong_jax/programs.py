"""The device programs of one instance: packed prefill and paged decode, each ending in sampling.

Programs are pure functions of (model state, KV cache, batch inputs, sampler inputs); the executor
compiles them ahead of time per shape bucket and donates the KV cache so it is updated in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from loong_jax.kv_pool import KVCache
from loong_jax.sampling import SamplerFlags, SamplerInputs, SamplerOutputs, sample
from pallas_kernels.reference import block_attention, merge_attention, paged_decode_attention, self_attention_term


class PrefillInputs(NamedTuple):
    """A packed batch of prompts: T token rows, R request rows (padding: seg -1, slot out of range)."""

    tokens: jnp.ndarray  # [T]
    positions: jnp.ndarray  # [T] position of each token in its request
    seg: jnp.ndarray  # [T] request row of each token, -1 for padding
    seq_lens: jnp.ndarray  # [T] prompt length of the token's request (dynamic RoPE)
    slots: jnp.ndarray  # [T] pool slot that keeps the token's K/V (>= num_slots: not kept)
    last_idx: jnp.ndarray  # [R] row in T of each request's last prompt token


class DecodeInputs(NamedTuple):
    """One new token for each of B requests."""

    tokens: jnp.ndarray  # [B]
    positions: jnp.ndarray  # [B]
    slots: jnp.ndarray  # [B] pool slot of the new token (>= num_slots for padding rows)
    page_table: jnp.ndarray  # [B, W] page ids of each request
    kv_lens: jnp.ndarray  # [B] tokens of each request already in the pool (before the new one)


def store_kv(cache: KVCache, slots: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> KVCache:
    """Write every layer's K/V [L, T, KV, D] into slots [T] in place; out-of-range slots are dropped."""
    return KVCache(
        cache.k.at[:, slots].set(k.astype(cache.k.dtype), mode="drop"),
        cache.v.at[:, slots].set(v.astype(cache.v.dtype), mode="drop"),
    )


def prefill_program(
    graphdef: nnx.GraphDef,
    flags: SamplerFlags,
    state: nnx.State,
    cache: KVCache,
    inp: PrefillInputs,
    samp: SamplerInputs,
) -> tuple[SamplerOutputs, KVCache]:
    """Run a packed prompt batch, keep its K/V in the pool and sample each request's first token."""
    model = nnx.merge(graphdef, state)

    def attend(layer, q, k, v):
        return block_attention(q, k, v, inp.positions, inp.seg, inp.positions, inp.seg)[0]

    h, k, v = model.hidden_states(inp.tokens, inp.positions, inp.seq_lens, attend)
    cache = store_kv(cache, inp.slots, k, v)
    return sample(model.logits(h[inp.last_idx]), samp, flags), cache


def decode_program(
    graphdef: nnx.GraphDef,
    page_size: int,
    flags: SamplerFlags,
    state: nnx.State,
    cache: KVCache,
    inp: DecodeInputs,
    samp: SamplerInputs,
) -> tuple[SamplerOutputs, KVCache]:
    """One decode step for a batch of requests whose KV is in this instance's pool."""
    model = nnx.merge(graphdef, state)

    def attend(layer, q, k, v):
        past, past_lse = paged_decode_attention(
            q, cache.k, cache.v, layer, inp.page_table, inp.kv_lens, page_size=page_size
        )
        own, own_lse = self_attention_term(q, k, v)
        return merge_attention(past, past_lse, own, own_lse)[0]

    h, k, v = model.hidden_states(inp.tokens, inp.positions, inp.positions + 1, attend)
    cache = store_kv(cache, inp.slots, k, v)
    return sample(model.logits(h), samp, flags), cache


def score_program(graphdef: nnx.GraphDef, state: nnx.State, tokens: jnp.ndarray) -> jnp.ndarray:
    """Logits [T, V] at every position of one sequence (no KV pool): for scoring and parity checks."""
    model = nnx.merge(graphdef, state)
    t = tokens.shape[0]
    pos, seg = jnp.arange(t, dtype=jnp.int32), jnp.zeros(t, jnp.int32)

    def attend(layer, q, k, v):
        return block_attention(q, k, v, pos, seg, pos, seg)[0]

    h, _, _ = model.hidden_states(tokens, pos, jnp.full((t,), t, jnp.int32), attend)
    return model.logits(h)
