"""What runs where in one iteration: the interface the scheduler implements, and the interim policy.

Each iteration partitions the instances into disjoint groups; a group runs one prefill batch (with a
scale-down placement plan) or one decode batch (with a master per request). `IdleFirstPolicy` is the
engine's policy until the cost-model scheduler lands: decode each request on the instances holding its
KV, prefill on the idle instances (or, when none is idle, pause the decode group with the fewest requests
for one prefill on its instances), place prompts busiest-instance-first, spread masters, and scale up
when a master's pool is full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from loong_jax.batching import bucket
from loong_jax.instances import Group
from loong_jax.kv_pool import PagePool
from loong_jax.placement import busiest_first_plan
from loong_jax.request import Request


@dataclasses.dataclass
class PrefillWork:
    group: Group
    requests: list[Request]
    plans: list[np.ndarray]  # per request: the group rank that keeps each token


@dataclasses.dataclass
class DecodeWork:
    group: Group
    requests: list[Request]
    masters: list[int]  # per request: the group rank of its master this step


@dataclasses.dataclass
class Iteration:
    prefills: list[PrefillWork] = dataclasses.field(default_factory=list)
    decodes: list[DecodeWork] = dataclasses.field(default_factory=list)

    def instances(self) -> list[int]:
        return [i for w in [*self.prefills, *self.decodes] for i in w.group]


@dataclasses.dataclass
class SchedulerView:
    """What a policy may look at: queues, per-instance pools and the admission budget."""

    waiting: Sequence[Request]
    decoding: Sequence[Request]
    pools: Sequence[PagePool]
    max_num_seqs: int
    max_prefill_tokens: int
    reserved_pages: int
    min_prefill_bucket: int = 16

    def rank_token_cap(self, degree: int) -> int:
        """Tokens per rank a prefill of this degree may hold: the largest warmed-up token bucket."""
        return bucket(-(-self.max_prefill_tokens // degree), self.min_prefill_bucket)

    def pages_to_reserve(self, req: Request) -> int:
        """Pages a request may ever need: prompt and all new tokens, plus a partial page per instance."""
        page = self.pools[0].page_size
        return -(-(len(req.prompt_ids) + req.max_new_tokens) // page) + len(self.pools)

    @property
    def total_pages(self) -> int:
        return sum(p.num_pages for p in self.pools)


class Policy(Protocol):
    def schedule(self, view: SchedulerView) -> Iteration: ...


def aligned_block(members: Sequence[int], n: int) -> Group:
    """Smallest aligned power-of-two block of instances containing all members (clipped to n)."""
    lo, hi = min(members), max(members)
    size = 1
    while lo // size != hi // size:
        size *= 2
    start = lo // size * size
    return tuple(range(start, min(start + size, n)))


class IdleFirstPolicy:
    """The interim policy (see module docstring). With `aligned_groups`, every group is an aligned
    power-of-two block of instances, which bounds the device sets to compile for (2N - 1)."""

    def __init__(self, num_instances: int, aligned_groups: bool = True):
        self.n = num_instances
        self.aligned = aligned_groups

    def schedule(self, view: SchedulerView) -> Iteration:
        groups = self._decode_groups(view)
        busy = {i for g, _ in groups for i in g}
        idle = [i for i in range(self.n) if i not in busy]
        it = Iteration()
        if view.waiting:
            if idle:
                work = self._admit(view, self._prefill_group(idle))
            else:  # no idle instance: pause the lightest decode group for one prefill on its instances
                group, _ = min(groups, key=lambda g: (len(g[1]), -len(g[0])))
                work = self._admit(view, group)
                if work is not None:
                    groups = [g for g in groups if g[0] != group]
            if work is not None:
                it.prefills.append(work)
        taken = set(it.instances())
        for group, reqs in groups:
            it.decodes.append(self._masters(view, group, reqs, taken))
            taken |= set(it.decodes[-1].group)
        return it

    def _decode_groups(self, view: SchedulerView) -> list[tuple[Group, list[Request]]]:
        """Connected sets of instances holding the decoding requests' KV (aligned blocks if asked)."""
        comps: list[tuple[set[int], list[Request]]] = []
        for req in view.decoding:
            holders = {i for i, p in enumerate(view.pools) if p.tokens.get(req.rid, 0)}
            holders = holders or {0}
            merged, reqs = set(holders), [req]
            for comp in [c for c in comps if c[0] & merged]:
                comps.remove(comp)
                merged |= comp[0]
                reqs += comp[1]
            comps.append((merged, reqs))
        changed = self.aligned
        while changed:
            changed = False
            comps = [(set(aligned_block(sorted(c), self.n)), r) for c, r in comps]
            for a in range(len(comps)):
                for b in range(a + 1, len(comps)):
                    if comps[a][0] & comps[b][0]:
                        comps[a] = (comps[a][0] | comps[b][0], comps[a][1] + comps[b][1])
                        del comps[b]
                        changed = True
                        break
                if changed:
                    break
        return [(tuple(sorted(c)), sorted(r, key=lambda q: q.rid)) for c, r in comps]

    def _prefill_group(self, idle: list[int]) -> Group:
        if not self.aligned:
            return tuple(idle)
        idle_set = set(idle)
        size = 1 << (self.n.bit_length() - 1)
        while size >= 1:
            for start in range(0, self.n, size):
                block = tuple(range(start, min(start + size, self.n)))
                if len(block) == size and idle_set.issuperset(block):
                    return block
            size //= 2
        return (idle[0],)

    def _admit(self, view: SchedulerView, group: Group) -> PrefillWork | None:
        """FCFS admission: memory-safe (growth reserved), within the batch and sequence limits."""
        pools = [view.pools[i] for i in group]
        page, d = pools[0].page_size, len(group)
        free = sum(p.free_pages for p in pools)
        reserved, tokens, batch = view.reserved_pages, 0, []
        cap = view.rank_token_cap(d)
        stripe, samplers = np.zeros(d, np.int64), np.zeros(d, np.int64)
        for req in view.waiting:
            n = len(req.prompt_ids)
            if len(view.decoding) + len(batch) >= view.max_num_seqs:
                break
            # Per rank: every d-th token of the prompt, and who samples it (the rank of its last token).
            new_stripe = stripe + (n - np.arange(d) + d - 1).clip(min=0) // d
            new_samplers = samplers + (np.arange(d) == (n - 1) % d)
            over = new_stripe.max() > cap or new_samplers.max() * view.min_prefill_bucket > cap
            if batch and (tokens + n > view.max_prefill_tokens or over):
                break
            need = view.pages_to_reserve(req)
            prompt_pages = -(-n // page) + len(group)
            if reserved + need > view.total_pages or prompt_pages > free:
                break
            batch.append(req)
            reserved, tokens, free = reserved + need, tokens + n, free - prompt_pages
            stripe, samplers = new_stripe, new_samplers
        if not batch:
            return None
        plans = busiest_first_plan([len(r.prompt_ids) for r in batch], pools)
        return PrefillWork(group, batch, plans)

    def _masters(self, view: SchedulerView, group: Group, reqs: list[Request], taken: set[int]) -> DecodeWork:
        """Pick each request's master: a holder with room, else any group instance with room (scale-up),
        else an idle instance that joins the group. Masters are spread: fewest assigned first."""
        free = {i: view.pools[i].free_pages for i in range(self.n)}
        load = {i: 0 for i in range(self.n)}
        members = list(group)
        masters: list[int] = []
        kept: list[Request] = []

        def room(i: int, req: Request) -> bool:
            return view.pools[i].pages_needed(req.rid, 1) <= free[i]

        for req in reqs:
            holders = [i for i in members if view.pools[i].tokens.get(req.rid, 0)]
            options = [i for i in holders if room(i, req)] or [i for i in members if room(i, req)]
            if not options:
                spare = [i for i in range(self.n) if i not in taken and i not in members and room(i, req)]
                if spare:
                    grown = set(members) | {spare[0]}
                    if self.aligned:
                        grown = set(aligned_block(sorted(grown), self.n))
                    if not grown & (taken - set(members)):
                        members = sorted(grown)
                        options = [i for i in members if room(i, req)]
            if not options:
                continue  # nowhere to put its next token this iteration: it waits one step
            best = min(options, key=lambda i: (load[i], -free[i], i))
            load[best] += 1
            free[best] -= view.pools[best].pages_needed(req.rid, 1)
            masters.append(best)
            kept.append(req)
        return DecodeWork(tuple(members), kept, [members.index(m) for m in masters])
