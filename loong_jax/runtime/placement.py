"""Host-side planning of group programs: striping, scale-down placement plans, and per-rank inputs.

Everything here is numpy on the host, computed once per batch and reused by every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from loong_jax.runtime.batching import bucket, prefill_rows
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.programs import PREFIX_BLOCK, DecodeInputs, PrefillInputs


def _fill_plan(
    lengths: Sequence[int],
    pools: Sequence[PagePool],
    busiest: bool,
    partial: bool = False,
    prefer: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Per request, the group rank keeping each token: ranks filled in load order up to their free pages
    (partial: a request the ranks cannot hold gets a plan for as many of its tokens as they hold; prefer:
    per request, ranks to fill before the others, e.g. those holding its cached prefix)."""
    load = [p.used_tokens for p in pools]
    free = [p.free_pages for p in pools]
    page = pools[0].page_size
    plans = []
    for k, n in enumerate(lengths):
        first = list(prefer[k]) if prefer else []
        rest = sorted(
            (r for r in range(len(pools)) if r not in first), key=lambda r: (-load[r] if busiest else load[r], r)
        )
        order = first + rest
        plan = np.empty(n, np.int32)
        at = 0
        for r in order:
            if at == n:
                break
            take = min(n - at, free[r] * page)
            if take:
                plan[at : at + take] = r
                free[r] -= -(-take // page)
                load[r] += take
                at += take
        if at < n and not partial:
            raise ValueError(f"the group cannot hold a {n}-token prompt ({sum(free)} free pages left)")
        plans.append(plan[:at])
    return plans


def busiest_first_plan(
    lengths: Sequence[int],
    pools: Sequence[PagePool],
    partial: bool = False,
    prefer: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """The paper's default scale-down plan: fill the group's busiest instances first, up to their free pages.

    A request thus lands on the fewest instances that can hold it, leaving the others idle for the next
    prefill. Raises if the group cannot hold the batch, unless `partial` (then plans may be shorter).
    `prefer`: per request, ranks filled first (where its cached prefix lies: its K/V stays together).
    """
    return _fill_plan(lengths, pools, busiest=True, partial=partial, prefer=prefer)


def least_loaded_plan(
    lengths: Sequence[int], pools: Sequence[PagePool], prefer: Sequence[Sequence[int]] | None = None
) -> list[np.ndarray]:
    """Scale-down onto the group's least-loaded instances: spreads decode work (shorter decode steps) at
    the price of fewer idle instances later."""
    return _fill_plan(lengths, pools, busiest=False, prefer=prefer)


@dataclasses.dataclass
class PrefillPlan:
    """Per-rank inputs of one ring prefill and where each request's first token is sampled."""

    inputs: PrefillInputs
    sample_rank: list[int | None]  # per request: the rank holding its last prompt token (None: not sampled)
    sample_row: list[int | None]  # per request: its row among that rank's sampled rows
    rows: int  # sampled rows per rank (bucketed)


def stripe(lengths: Sequence[int], d: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per rank: (request index, position) of its tokens; token p of a request goes to rank p mod d."""
    out = []
    for r in range(d):
        reqs, pos = [], []
        for i, n in enumerate(lengths):
            p = np.arange(r, n, d, dtype=np.int32)
            reqs.append(np.full(len(p), i, np.int32))
            pos.append(p)
        out.append((np.concatenate(reqs), np.concatenate(pos)))
    return out


def build_prefill(
    prompts: Sequence[Sequence[int]],
    rids: Sequence[int],
    plans: Sequence[np.ndarray],
    pools: Sequence[PagePool],
    *,
    starts: Sequence[int] | None = None,
    totals: Sequence[int] | None = None,
    sampled: Sequence[bool] | None = None,
    min_tokens: int = 16,
    max_rows: int = 64,
    prefix_width: int | None = None,
) -> PrefillPlan:
    """Allocate each kept token's slot in its keeper's pool and lay out the ring inputs for every rank.

    prompts are the tokens this pass computes of each request; with `starts` they continue a prompt whose
    first starts[i] tokens' K/V the request already holds in the group's pools (appending prefill: those
    are attended where they lie), `totals` its whole length, and `sampled` whether this pass ends it (its
    first new token is sampled). `prefix_width`: room per rank for the slots of held K/V (a multiple of
    PREFIX_BLOCK; the executor gives what a whole pool needs, so that shapes never depend on it; default:
    what this batch needs; none where nothing is held)."""
    d = len(pools)
    num_slots = pools[0].num_slots
    lengths = [len(p) for p in prompts]
    starts = [0] * len(prompts) if starts is None else list(starts)
    totals = [s + n for s, n in zip(starts, lengths)] if totals is None else list(totals)
    sampled = [True] * len(prompts) if sampled is None else list(sampled)
    held = [
        [pools[r].slots(rid) if start else np.zeros(0, np.int64) for r in range(d)] for rid, start in zip(rids, starts)
    ]
    for i, (rid, start) in enumerate(zip(rids, starts)):
        if sum(len(h) for h in held[i]) != start:
            raise ValueError(
                f"request {rid} continues at token {start} but holds {sum(len(h) for h in held[i])} tokens' K/V in "
                "this group's pools (an appending prefill's group must include every instance holding its K/V)"
            )
    # Slots: each rank appends the tokens it keeps of each request (in position order) to its pool.
    slot_of = [np.empty(n, np.int64) for n in lengths]
    for i, (rid, plan) in enumerate(zip(rids, plans)):
        if len(plan) != lengths[i]:
            raise ValueError(f"plan of request {i} has {len(plan)} entries for {lengths[i]} tokens")
        for r in range(d):
            mine = np.nonzero(plan == r)[0]
            if len(mine):
                slot_of[i][mine] = pools[r].append(rid, len(mine), starts[i] + mine)
    stripes = stripe(lengths, d)
    samplers = np.bincount([(n - 1) % d for n, s in zip(lengths, sampled) if s], minlength=d).max()
    t = bucket(max(max(len(s[0]) for s in stripes), min_tokens * samplers), min_tokens)
    tokens = np.zeros((d, t), np.int32)
    positions = np.zeros((d, t), np.int32)
    seg = np.full((d, t), -1, np.int32)
    seq_lens = np.ones((d, t), np.int32)
    keeper = np.full((d, t), -1, np.int32)  # rank keeping each striped token
    slot = np.full((d, t), num_slots, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    all_tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    all_keeper, all_slot = np.concatenate(plans), np.concatenate(slot_of)
    for r, (req, pos) in enumerate(stripes):
        n, g = len(req), offsets[req] + pos
        tokens[r, :n], keeper[r, :n], slot[r, :n] = all_tokens[g], all_keeper[g], all_slot[g]
        positions[r, :n], seg[r, :n] = pos + np.asarray(starts, np.int32)[req], req
        seq_lens[r, :n] = np.asarray(totals, np.int32)[req]
    keep_slots = np.full((d, d, t), num_slots, np.int32)
    for r in range(d):
        for step in range(d):
            origin = (r - step) % d
            keep_slots[r, step] = np.where(keeper[origin] == r, slot[origin], num_slots)
    sample_rank, sample_row, per_rank = [], [], [[] for _ in range(d)]
    for i, n in enumerate(lengths):
        if not sampled[i]:
            sample_rank.append(None)
            sample_row.append(None)
            continue
        r = (n - 1) % d
        local = int(np.nonzero((seg[r] == i) & (positions[r] == starts[i] + n - 1))[0][0])
        sample_rank.append(r)
        sample_row.append(len(per_rank[r]))
        per_rank[r].append(local)
    rows = prefill_rows(t, min_tokens, max_rows)
    last_idx = np.zeros((d, rows), np.int32)
    for r, locs in enumerate(per_rank):
        last_idx[r, : len(locs)] = locs
    counts = np.array([sum(len(per_req[r]) for per_req in held) for r in range(d)], np.int32)
    width = prefix_width or max(PREFIX_BLOCK, -(-int(counts.max()) // PREFIX_BLOCK) * PREFIX_BLOCK)
    if not counts.any():  # nothing held: the program has no appending part at all
        width = 0
    if counts.max() > width:
        raise ValueError(f"a rank holds {counts.max()} tokens of the batch's K/V, more than prefix_width={width}")
    prefix_slots = np.full((d, width), num_slots, np.int32)
    prefix_seg = np.full((d, width), -1, np.int32)
    for r in range(d):
        at = 0
        for i in range(len(prompts)):
            h = held[i][r]
            prefix_slots[r, at : at + len(h)], prefix_seg[r, at : at + len(h)] = h, i
            at += len(h)
    inputs = PrefillInputs(tokens, positions, seg, seq_lens, keep_slots, last_idx, prefix_slots, prefix_seg, counts)
    return PrefillPlan(inputs, sample_rank, sample_row, rows)


@dataclasses.dataclass
class DecodePlan:
    inputs: DecodeInputs
    rows: int  # master rows per rank (bucketed)
    rank_requests: list[list[int]]  # per rank: indices (into the batch) of the requests it is master of
    reserved: list[int]  # per request: the slots reserved for it (the most tokens it may sample in the burst)


def build_decode(
    rids: Sequence[int],
    last_tokens: Sequence[int],
    positions: Sequence[int],
    masters: Sequence[int],
    pools: Sequence[PagePool],
    width: int,
    budgets: Sequence[int] | None = None,
    steps: int = 1,
) -> DecodePlan:
    """Per-rank inputs of a burst of `steps` decode steps; reserves each request's slots for them at its
    master (as many as its budget, budgets[i] new tokens it may still sample, and the master's room allow).

    masters[i] is the group rank of request i's master; pools are the group's instances' pools in order.
    The page tables list the reserved pages too; kv_lens count what each rank held before the burst.
    """
    d = len(pools)
    num_slots = pools[0].num_slots
    budgets = [steps] * len(rids) if budgets is None else list(budgets)
    rank_requests: list[list[int]] = [[] for _ in range(d)]
    for i, m in enumerate(masters):
        rank_requests[m].append(i)
    b = bucket(max(len(x) for x in rank_requests))
    tokens = np.zeros((d, b), np.int32)
    pos = np.zeros((d, b), np.int32)
    slots = np.full((d, steps, b), num_slots, np.int32)
    table = np.zeros((d, d * b, width), np.int32)
    kv_lens = np.zeros((d, d * b), np.int32)
    live = np.zeros((d, b), bool)
    reserved = [0] * len(rids)
    for m, members in enumerate(rank_requests):
        for j, i in enumerate(members):
            row = m * b + j
            for r, pool in enumerate(pools):
                kv_lens[r, row] = pool.tokens.get(rids[i], 0)
            n = reserved[i] = burst_tokens(pools[m], rids[i], steps, budgets[i])
            slots[m, :n, j] = pools[m].append(rids[i], n, positions[i] + np.arange(n))
            for r, pool in enumerate(pools):
                pages = pool.pages.get(rids[i])
                if pages:  # padding entries stay page 0, masked by the token count
                    table[r, row, : len(pages)] = pages
            tokens[m, j], pos[m, j], live[m, j] = last_tokens[i], positions[i], n > 0
    return DecodePlan(DecodeInputs(tokens, pos, slots, table, kv_lens, live), b, rank_requests, reserved)


def burst_tokens(master: PagePool, rid: int, steps: int, budget: int) -> int:
    """Tokens of a decode burst of `steps` to reserve for request rid at its master: no more than the new
    tokens it may still sample (its budget) nor than the master's pool has room for. The row stops there."""
    return max(0, min(steps, budget, master.room(rid)))
