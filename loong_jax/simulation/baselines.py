"""The systems elastic sequence parallelism is compared with, each as a policy over the same engine.

* `StaticGroupPolicy`: one fixed group of all instances (static sequence parallelism, TP2 x SP4), KV kept
  where it is computed (even striping), prefill-first.
* `IdleFirstPolicy` on one instance of TP=8 is vLLM-style prefill-first continuous batching.
* `ChunkedPrefillPolicy`: one instance, every pass fuses the running decodes with up to `chunk` prompt
  tokens (Sarathi-Serve / SplitFuse).
* `DisaggregatedPolicy`: instance 0 prefills, instance 1 decodes, KV moves between them (DistServe).
* `ReplicaPolicy`: independent instances, each request served by one of them (data parallel).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.request import Request
from loong_jax.runtime.work import DecodeWork, Iteration, Migration, PrefillWork
from loong_jax.scheduling.policy import SchedulerView, admit_fcfs, assign_masters, holders


def even_plan(lengths: Sequence[int], pools: Sequence[PagePool]) -> list[np.ndarray]:
    """Keep every token on the rank that computed it (no scale-down): token t on rank t mod d."""
    return [np.arange(n, dtype=np.int32) % len(pools) for n in lengths]


def local_plan(lengths: Sequence[int], pools: Sequence[PagePool]) -> list[np.ndarray]:
    return [np.zeros(n, np.int32) for n in lengths]


def whole_on_one_instance(req: Request, page_size: int) -> int:
    """Pages a request may ever need when all its KV stays on one instance."""
    return -(-(req.num_prefill_tokens + req.expected_new_tokens) // page_size)


class StaticGroupPolicy:
    """All instances always form one group; prefill-first; KV stays evenly striped."""

    def __init__(self, num_instances: int):
        self.group = tuple(range(num_instances))

    def schedule(self, view: SchedulerView) -> Iteration:
        if view.busy:
            return Iteration()
        work = admit_fcfs(view, self.group, even_plan) if view.waiting else None
        if work is not None:
            return Iteration(prefills=[work])
        if not view.decoding:
            return Iteration()
        decode, _ = assign_masters(view, len(self.group), self.group, list(view.decoding), set(), aligned=False)
        return Iteration(decodes=[decode])


class ChunkedPrefillPolicy:
    """One instance; each pass runs every decode plus prompt chunks up to `chunk` tokens in total."""

    def __init__(self, chunk: int):
        self.chunk = chunk

    def schedule(self, view: SchedulerView) -> Iteration:
        if view.busy:
            return Iteration()
        decoding = list(view.decoding)
        budget = self.chunk - len(decoding)
        reqs: list[Request] = []
        sizes: list[int] = []
        for req in view.prefilling:  # continue prompts already started
            if budget <= 0:
                break
            take = min(budget, req.prefill_len - req.prefilled)
            reqs.append(req)
            sizes.append(take)
            budget -= take
        if budget > 0 and view.waiting:
            page = view.pools[0].page_size
            reserved, free = view.reserved_pages, view.pools[0].free_pages
            for req in view.waiting:
                if budget <= 0 or view.num_running + len(reqs) >= view.max_num_seqs:
                    break
                need = view.pages_to_reserve(req)
                if reserved + need > view.total_pages or -(-req.num_prefill_tokens // page) + 1 > free:
                    break
                take = min(budget, req.num_prefill_tokens)
                reqs.append(req)
                sizes.append(take)
                reserved, free, budget = reserved + need, free - need, budget - take
        decode = DecodeWork((0,), decoding, [0] * len(decoding)) if decoding else None
        if not reqs:
            return Iteration(decodes=[decode] if decode else [])
        plans = [np.zeros(r.prefill_len if r.prefill_len else r.num_prefill_tokens, np.int32) for r in reqs]
        return Iteration(prefills=[PrefillWork((0,), reqs, plans, chunk=sizes, piggyback=decode)])


class DisaggregatedPolicy:
    """Instance 0 prefills, instance 1 decodes; a prefilled request's KV moves to instance 1 as a whole."""

    def schedule(self, view: SchedulerView) -> Iteration:
        it = Iteration()
        on_prefill = [r for r in view.decoding if holders(view, r) == {0}]
        on_decode = [r for r in view.decoding if 0 not in holders(view, r)]
        free = {0, 1} - view.busy
        decode_pages = view.pools[1].num_pages
        reserve = functools.partial(whole_on_one_instance, page_size=view.pools[1].page_size)

        if on_prefill and free == {0, 1}:  # move finished prefills to the decode instance first
            room = view.pools[1].free_pages * view.pools[1].page_size
            for r in on_prefill:
                n = view.pools[0].tokens[r.rid]
                if n + view.pools[1].page_size <= room:
                    it.migrations.append(Migration(r.rid, 0, 1, n))
                    room -= n + view.pools[1].page_size
            if it.migrations:
                return it
        if 0 in free and view.waiting:
            committed = sum(reserve(r) for r in view.running)  # every running request ends on instance 1
            work = admit_fcfs(view, (0,), local_plan, reserve, decode_pages - committed)
            if work is not None:
                it.prefills.append(work)
        if 1 in free and on_decode:
            it.decodes.append(DecodeWork((1,), on_decode, [0] * len(on_decode)))
        return it


PREFIX_IMBALANCE = 8  # requests: a prefix-aware router sends to the least loaded replica beyond this


class ReplicaPolicy:
    """Independent instances behind a load balancer: each request is assigned to one instance when it
    arrives (round robin; the instance with the most free memory; or, with "prefix", by a cache-aware
    router: see `_prefix_route`) and is prefilled and
    decoded there, prefill-first, in that instance's own queue."""

    BALANCES = ("round_robin", "most_free", "prefix")

    def __init__(self, num_instances: int, balance: str = "round_robin"):
        if balance not in self.BALANCES:
            raise ValueError(f"balance must be one of {', '.join(self.BALANCES)}, got {balance!r}")
        self.n = num_instances
        self.balance = balance
        self.assigned: dict[int, int] = {}
        self._next = 0

    def _assign(self, view: SchedulerView) -> None:
        load = [0] * self.n  # requests each replica runs or has queued
        for r in view.running:
            load[min(holders(view, r) or {0})] += 1
        for i in self.assigned.values():
            load[i] += 1
        for req in view.waiting:
            if req.rid in self.assigned:
                continue
            if self.balance == "round_robin":
                i = self._next % self.n
                self._next += 1
            elif self.balance == "most_free":
                i = max(range(self.n), key=lambda i: (view.pools[i].free_pages, -i))
            else:
                i = self._prefix_route(view, req, load)
            self.assigned[req.rid] = i
            load[i] += 1

    def _prefix_route(self, view: SchedulerView, req: Request, load: list[int]) -> int:
        """A cache-aware router (as SGLang's): the replica caching most of the prompt (in its pool, then in its
        own host tier if it has one) if that is at least half of it and the replicas' loads are balanced
        (within PREFIX_IMBALANCE requests), else the least loaded replica."""
        cached = [view.cached_pages(req, [i]) for i in range(self.n)]
        cached = [c + view.host_pages(req, c, [i]) for i, c in enumerate(cached)]  # and its own host tier's
        best = max(range(self.n), key=lambda i: (cached[i], -load[i], -i))
        lightest = min(range(self.n), key=lambda i: (load[i], i))
        match = cached[best] * view.pools[0].page_size / max(1, req.num_prefill_tokens)
        if match >= 0.5 and load[best] - load[lightest] <= PREFIX_IMBALANCE:
            return best
        return lightest

    def schedule(self, view: SchedulerView) -> Iteration:
        self._assign(view)
        it = Iteration()
        mine: dict[int, list[Request]] = {i: [] for i in range(self.n)}
        for r in view.decoding:
            mine[min(holders(view, r))].append(r)
        reserve = functools.partial(whole_on_one_instance, page_size=view.pools[0].page_size)

        launched = 0
        for i in range(self.n):
            if i in view.busy:
                continue
            queue = [r for r in view.waiting if self.assigned.get(r.rid) == i]
            if queue:
                pool = view.pools[i]
                committed = max(sum(reserve(r) for r in mine[i]), pool.num_pages - pool.free_pages)
                sub = dataclasses.replace(view, waiting=queue, decoding=mine[i], reserved_pages=0,
                                          num_running=view.num_running + launched)  # fmt: skip
                work = admit_fcfs(sub, (i,), local_plan, reserve, pool.num_pages - committed)
                if work is not None:
                    it.prefills.append(work)
                    launched += len(work.requests)
                    for r in work.requests:
                        self.assigned.pop(r.rid)
                    continue
            if mine[i]:
                it.decodes.append(DecodeWork((i,), mine[i], [0] * len(mine[i])))
        return it
