"""The device programs of a group of instances, each a `jax.jit` of one `jax.shard_map` over the group mesh.

* `prefill_program`: striped ring attention (DESIGN 2.1). Each rank holds every d-th token of every
  request; per layer the K/V blocks travel round the ring with `ppermute`, each rank attends its queries
  to every block and, as a block passes, writes the tokens the placement plan gives it into its own pool
  in place (proactive scale-down, DESIGN 2.2: no byte moves that the ring does not already move).
  Appending: where the batch's requests already hold K/V in the group's pools (earlier chunks of their
  prompts, or a cached prefix), queries are also all-gathered and every rank attends them to the K/V it
  holds, as decoding does (`held_attention`: the Pallas kernel skips, on the device, what is not held, so
  the program's shapes do not depend on how much is held and the warmed programs serve every hit); the
  partials go back with an all-to-all and are merged with the ring's by log-sum-exp. Whether a batch
  appends is static (a batch holding nothing has an empty list of held slots and none of this code).
* `decode_program`: multi-master decoding (DESIGN 2.3). Masters run the dense layers for their requests;
  per layer queries are all-gathered, every rank attends them to the K/V it holds, the (output,
  log-sum-exp) partials go back to the masters with an all-to-all and are merged exactly. Each layer's new
  K/V is written into the slot reserved for it at the master before the pools are read (a write after the
  read would make XLA copy the pool), so the new token is attended where it lies. One launch runs a burst of
  K steps: each sampled token is the next step's input, and a row that samples a stop token or reaches its
  budget stops (padding after it).
* `migrate_program`: move K/V tokens from one instance's pool to another's (packing decode batches).

A group of one instance runs the same programs (the ring has one step, the collectives are trivial).
Every array argument has a leading "sp" axis of the group's size; inside, each rank sees its own row.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from loong_jax.model.llama import TensorParallel
from loong_jax.model.sampling import SamplerFlags, SamplerInputs, SamplerOutputs, advance, ends_row, sample
from loong_jax.runtime.kv_pool import KVCache
from pallas_kernels import AttentionBackend, block_attention, merge_attention, merge_attention_many
from pallas_kernels.reference import HELD_BLOCK

SP = "sp"
PREFIX_BLOCK = HELD_BLOCK  # an appending prefill's list of held slots is a multiple of this long


class PrefillInputs(NamedTuple):
    """Per rank (leading axis d): its stripe of a packed prompt batch and its part of the placement plan."""

    tokens: jnp.ndarray  # [d, T]
    positions: jnp.ndarray  # [d, T] global position of each token in its request
    seg: jnp.ndarray  # [d, T] request row of each token in the batch, -1 for padding
    seq_lens: jnp.ndarray  # [d, T] prompt length of the token's request (dynamic RoPE)
    keep_slots: jnp.ndarray  # [d, d, T] at ring step s: this rank's pool slot for each token of the
    #                          visiting block (the plan), >= pool size where another rank keeps it
    last_idx: jnp.ndarray  # [d, R] local row of each last prompt token this rank samples
    prefix_slots: jnp.ndarray  # [d, S] slots in this rank's pool of K/V the batch's requests already hold
    #                            (earlier chunks, a cached prefix; >= pool size: padding); S: a multiple
    #                            of PREFIX_BLOCK that holds a whole pool, or 0 where no rank holds any
    prefix_seg: jnp.ndarray  # [d, S] request row of each of those tokens, -1 for padding
    prefix_len: jnp.ndarray  # [d] how many of this rank's prefix_slots are listed (the rest is padding)


class DecodeInputs(NamedTuple):
    """Per rank: the requests it is master of (B rows), and what it holds of every request (d * B rows), for
    a burst of K steps."""

    tokens: jnp.ndarray  # [d, B] last sampled token of each master row
    positions: jnp.ndarray  # [d, B]
    slots: jnp.ndarray  # [d, K, B] slot in the master's pool for each step's K/V (>= pool size: padding)
    page_table: jnp.ndarray  # [d, d * B, W] this rank's pages of every request (rank-major rows), the
    #                          pages of the burst's slots included
    kv_lens: jnp.ndarray  # [d, d * B] tokens of each request this rank holds before the burst
    live: jnp.ndarray  # [d, B] bool: rows that take part (padding: False); a row stops at its first step
    #                    without a reserved slot (the host reserves no more than its max_tokens allow)


class DecodeCarry(NamedTuple):
    """What a burst leaves for the next burst of the same rows, on the device: each row's last sampled token,
    whether it still runs (no stop token sampled), and its sampler state after the burst (seed steps, the
    min_tokens count, the output ids penalties count). A chained burst starts from it instead of the host's
    copy, so it can be dispatched before the burst before it has been read."""

    tokens: jnp.ndarray  # [d, B]
    live: jnp.ndarray  # [d, B] bool
    samp: SamplerInputs


def store_kv(pool: KVCache, slots: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> KVCache:
    """Write every layer's K/V [L, KV, N, D] into one rank's pool [1, L, KV, S, D] at slots [N], in place."""

    def put(buf, new):  # scatter on the [L, KV, S, D] view: one index dimension
        return buf[0].at[:, :, slots].set(new.astype(buf.dtype), mode="drop")[None]

    return KVCache(put(pool.k, k), put(pool.v, v))


def store_layer_kv(pool: KVCache, layer: jnp.ndarray, slots: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> KVCache:
    """Write one layer's K/V [N, KV, D] into one rank's pool [1, L, KV, S, D] at slots [N], in place (slots
    past the pool are dropped)."""
    if slots.shape[0] == 1:  # XLA turns a one-index scatter into a read-modify-write of the slot, which then
        # makes it copy the whole pool every step; a second, dropped index keeps it a scatter, done in place
        slots, k, v = jnp.append(slots, pool.k.shape[3]), jnp.concatenate([k, k]), jnp.concatenate([v, v])
    return KVCache(
        pool.k.at[0, layer, :, slots].set(k.astype(pool.k.dtype), mode="drop"),
        pool.v.at[0, layer, :, slots].set(v.astype(pool.v.dtype), mode="drop"),
    )


def _row(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def _with_row(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[None], tree)


def _group_program(mesh: Mesh, param_specs: Any, pool_spec: P, body: Any, carry: bool = False) -> Any:
    """shard_map `body(params, pools, *rows)` over the mesh: params per their specs, the rest split on sp;
    it returns (rows, pools) or, with carry, (rows, pools, rows)."""
    pools = KVCache(pool_spec, pool_spec)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(param_specs, pools, P(SP), P(SP)),
        out_specs=(P(SP), pools, P(SP)) if carry else (P(SP), pools),
        check_vma=False,
    )


def prefill_program(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    param_specs: Any,
    pool_spec: P,
    tp: TensorParallel | None,
    attn: AttentionBackend,
    flags: SamplerFlags,
    params: Any,
    pools: KVCache,
    inp: PrefillInputs,
    samp: SamplerInputs,
) -> tuple[SamplerOutputs, KVCache]:
    """Ring prefill of a packed batch on the group, keeping K/V where the plan says, sampling first tokens."""
    d = mesh.shape[SP]
    ring = [(i, (i + 1) % d) for i in range(d)]
    appending = inp.prefix_slots.shape[-1] > 0

    def body(params, pools, inp, samp):
        inp, samp = _row(inp), _row(samp)
        model = nnx.merge(graphdef, params)
        gather = functools.partial(jax.lax.all_gather, axis_name=SP, tiled=True)

        def attend(layer, q, k, v, pool):
            block = (k, v, inp.positions, inp.seg)
            out = lse = None
            for step in range(d):
                bk, bv, bpos, bseg = block
                o, part_lse = attn.block_attention(q, bk, bv, inp.positions, inp.seg, bpos, bseg)
                out, lse = (o, part_lse) if out is None else merge_attention(out, lse, o, part_lse)
                pool = store_layer_kv(pool, layer, inp.keep_slots[step], bk, bv)
                if step + 1 < d:
                    block = jax.tree.map(lambda x: jax.lax.ppermute(x, SP, ring), block)

            if not appending:
                return out, pool
            q_all = gather(q) if d > 1 else q  # every query of the batch against the K/V this rank holds
            q_seg = gather(inp.seg) if d > 1 else inp.seg
            o, part_lse = attn.held_attention(
                q_all, q_seg, pool.k[0], pool.v[0], layer, inp.prefix_slots, inp.prefix_seg, inp.prefix_len
            )
            t = q.shape[0]
            if d > 1:  # the partials of my queries, from every rank: [d, T, ...]
                o = jax.lax.all_to_all(o, SP, 0, 0, tiled=True).reshape(d, t, *o.shape[1:])
                part_lse = jax.lax.all_to_all(part_lse, SP, 0, 0, tiled=True).reshape(d, t, *part_lse.shape[1:])
            else:
                o, part_lse = o[None], part_lse[None]
            merged, _ = merge_attention_many(
                jnp.concatenate([o, out[None].astype(o.dtype)]), jnp.concatenate([part_lse, lse[None]])
            )
            return merged.astype(out.dtype), pool

        h, pools = model.hidden_states(inp.tokens, inp.positions, inp.seq_lens, attend, pools, tp)
        out = sample(model.logits(h[inp.last_idx]), samp, flags)
        return _with_row(out), pools

    return _group_program(mesh, param_specs, pool_spec, body)(params, pools, inp, samp)


def decode_program(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    param_specs: Any,
    pool_spec: P,
    tp: TensorParallel | None,
    attn: AttentionBackend,
    page_size: int,
    flags: SamplerFlags,
    params: Any,
    pools: KVCache,
    inp: DecodeInputs,
    samp: SamplerInputs,
) -> tuple[SamplerOutputs, KVCache, DecodeCarry]:
    """A burst of K multi-master decode steps of a batch whose KV is spread over the group in any
    proportions; outputs are [K, B] per rank (token -1 where a row did not take the step), and the state
    the next burst of the same rows may start from."""
    d = mesh.shape[SP]

    def body(params, pools, inp, samp):
        inp, samp = _row(inp), _row(samp)
        model = nnx.merge(graphdef, params)
        b = inp.tokens.shape[0]
        me = jax.lax.axis_index(SP) if d > 1 else 0

        def step(carry, slots):
            pools, tokens, positions, kv_lens, live, samp = carry
            live = live & (slots < pools.k.shape[3])  # no slot reserved for this step: the row stops
            slots = jnp.where(live, slots, pools.k.shape[3])

            mine = jnp.zeros_like(kv_lens).at[me * b + jnp.arange(b)].set(live.astype(jnp.int32))
            lens = kv_lens + mine  # my master rows attend to this step's token too, written first

            def attend(layer, q, k, v, pools):
                pools = store_layer_kv(pools, layer, slots, k, v)
                q_all = jax.lax.all_gather(q, SP, tiled=True) if d > 1 else q
                o, lse = attn.paged_decode_attention(
                    q_all, pools.k[0], pools.v[0], layer, inp.page_table, lens, page_size=page_size
                )
                if d == 1:
                    return o, pools
                # the partials for my master rows, from every rank: [d, B, ...]
                o = jax.lax.all_to_all(o, SP, 0, 0, tiled=True).reshape(d, b, *o.shape[1:])
                lse = jax.lax.all_to_all(lse, SP, 0, 0, tiled=True).reshape(d, b, *lse.shape[1:])
                return merge_attention_many(o, lse)[0], pools

            h, pools = model.hidden_states(tokens, positions, positions + 1, attend, pools, tp)
            out = sample(model.logits(h), samp, flags)
            emitted = jnp.where(live, out.tokens, -1)
            ended = ends_row(samp, out.tokens)  # judged by the inputs the token was sampled with
            samp = advance(samp, out.tokens, live)
            carry = (pools, out.tokens, positions + 1, lens, live & ~ended, samp)
            return carry, out._replace(tokens=emitted)

        carry = (pools, inp.tokens, inp.positions, inp.kv_lens, inp.live, samp)
        (pools, tokens, _, _, live, samp), outs = jax.lax.scan(step, carry, inp.slots)
        return _with_row(outs), pools, _with_row(DecodeCarry(tokens, live, samp))

    return _group_program(mesh, param_specs, pool_spec, body, carry=True)(params, pools, inp, samp)


class MigrateInputs(NamedTuple):
    """Row 0 is the source instance, row 1 the destination (mesh of the pair, in that order)."""

    src_slots: jnp.ndarray  # [2, N] slots to read on the source (row 1: ignored)
    dst_slots: jnp.ndarray  # [2, N] slots to write on the destination (row 0: all out of range)


def migrate_program(mesh: Mesh, pool_spec: P, pools: KVCache, inp: MigrateInputs) -> KVCache:
    """Copy N tokens' K/V of every layer from the source's pool to the destination's, in place."""

    def body(pools, inp):
        inp = _row(inp)
        moved = []
        for x in pools:
            picked = jnp.take(x[0], inp.src_slots, axis=2, mode="fill", fill_value=0)
            moved.append(jax.lax.ppermute(picked, SP, [(0, 1)]))
        return store_kv(pools, inp.dst_slots, *moved)

    spec = KVCache(pool_spec, pool_spec)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, P(SP)), out_specs=spec, check_vma=False)(pools, inp)


def gather_pages_program(pool: KVCache, slots: jnp.ndarray) -> KVCache:
    """K and V of whole pages of one instance's pool [1, L, KV, S, D]: slots [n, page] -> [n, L, KV, page, D]
    each, page-major as the host tier keeps them (slots past the pool read zeros)."""

    def take(x):
        return jnp.moveaxis(jnp.take(x[0], slots, axis=2, mode="fill", fill_value=0), 2, 0)

    return KVCache(take(pool.k), take(pool.v))


def scatter_pages_program(pool: KVCache, slots: jnp.ndarray, pages: KVCache) -> tuple[KVCache, jnp.ndarray]:
    """Write pages [n, L, KV, page, D] (K and V) into one instance's pool at slots [n, page], in place (slots
    past the pool are dropped). Also returns a scalar that is ready when the write is done (the pool is
    donated to the next program, so it cannot tell that)."""

    def flat(x):
        return jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], -1, x.shape[-1])

    return store_kv(pool, slots.reshape(-1), flat(pages.k), flat(pages.v)), slots[0, 0] + 1


@functools.partial(jax.jit, static_argnums=0)
def score_program(graphdef: nnx.GraphDef, state: nnx.State, tokens: jnp.ndarray) -> jnp.ndarray:
    """Logits [T, V] at every position of one sequence (no KV pool): for scoring and parity checks."""
    model = nnx.merge(graphdef, state)
    t = tokens.shape[0]
    pos, seg = jnp.arange(t, dtype=jnp.int32), jnp.zeros(t, jnp.int32)

    def attend(layer, q, k, v, carry):
        return block_attention(q, k, v, pos, seg, pos, seg)[0], carry

    h, _ = model.hidden_states(tokens, pos, jnp.full((t,), t, jnp.int32), attend)
    return model.logits(h)
