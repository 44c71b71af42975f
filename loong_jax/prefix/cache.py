"""The prefix cache over the unified distributed KV pool.

Full pages are cached under keys chained over every token before them (`kv_pool.prefix_keys`), in the
pool of whichever instance holds them: a cached prefix may lie on any instances in any proportion, like
any request's KV. When a waiting request starts its prefill on a group, the longest run of its prefix
pages cached on the group's instances is shared with it (reference counts; nothing held is ever evicted)
and its prefill computes only the tokens after them, appending to that K/V where it lies (the appending
ring prefill). A request's full aligned pages are published when its prefill ends and when it finishes
(its generated tokens too, for the next turn of a conversation). The last, partial page is never shared:
a request always computes at least its last prompt token. A request's `cache_salt` is mixed into its keys:
only requests with the same salt (and model) share pages, which is how tenants are kept apart.

With a host tier (`host_tier.py`), pages the pools evict are kept in host memory too: a prefix continues
there where the pools' copy ends, and those pages are loaded into the pools of the group the prefill runs
on, each on the instance its plan puts that page's tokens on, before the prefill that appends to them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from loong_jax.prefix.host_tier import HostTier
from loong_jax.runtime.kv_pool import PagePool, prefix_keys
from loong_jax.runtime.placement import busiest_first_plan
from loong_jax.runtime.request import Request
from loong_jax.runtime.work import FatalError, PrefillWork

log = logging.getLogger("loong_jax")
PREFETCH_RID = -2  # the owner of pages being prefetched (for the time of the call)
# Copies pages of an instance's pool into slots of its host tier's store: (instance, pages, slots).
Saver = Callable[[int, Sequence[int], Sequence[int]], Any]
# Loads slots of the host tier's store into pages of instances' pools: {instance: (pages, slots)}; dispatched,
# not waited for (raises if a load cannot be started).
Loader = Callable[[dict[int, tuple[list[int], list[int]]]], Any]


@dataclasses.dataclass
class PrefixStats:
    """Counters of the cache (exported as metrics)."""

    queries: int = 0  # prefills that looked for a cached prefix
    query_tokens: int = 0  # their prompt tokens
    hits: int = 0  # prefills that found one
    hit_tokens: int = 0  # prompt tokens not computed thanks to it


class PrefixCache:
    """Looks up, shares and publishes cached prefix pages in the instances' page pools."""

    def __init__(self, pools: Sequence[PagePool], salt: bytes = b"", enabled: bool = True):
        self.pools = pools
        self.page_size = pools[0].page_size
        self.salt = salt
        self.enabled = enabled
        self.stats = PrefixStats()
        self.tiers: list[HostTier | None] = [None] * len(pools)  # per instance: where its evicted pages go
        self.failed_loads: list[int] = []  # instances where a load failed since the engine last looked

    def use_host_tier(self, tier: HostTier, instances: Sequence[int] | None = None) -> None:
        """Keep the pages these instances' pools (all by default) evict in this host tier, and load them back
        on a hit into any of them. Instances of one host share its tier; separate deployments (replicas) may
        each have their own."""
        if self.enabled:
            for i in range(len(self.pools)) if instances is None else instances:
                self.tiers[i] = tier
                self.pools[i].evicted = []

    @property
    def tier(self) -> HostTier | None:
        """Instance 0's host tier: the engine's one tier, shared by all its instances."""
        return self.tiers[0]

    def host_tiers(self) -> list[HostTier]:
        """Every distinct host tier."""
        return list({id(t): t for t in self.tiers if t is not None}.values())

    def spill(self, instances: Sequence[int], save: Saver) -> None:
        """Save the pages these instances' pools evicted since the last call into the host tier (call right
        before a program that may overwrite them is dispatched): save(instance, pages, slots) copies them into
        those slots of the tier's store, not waiting. Pages the tier holds already are not copied."""
        for i in instances:
            tier = self.tiers[i]
            if tier is None or not self.pools[i].evicted:
                continue
            evicted, self.pools[i].evicted = self.pools[i].evicted, []
            todo = {key: page for page, key in evicted if key not in tier}
            if not todo:
                continue
            started = time.perf_counter()
            slots = tier.put(list(todo))
            taken = [(key, page, slot) for (key, page), slot in zip(todo.items(), slots) if slot is not None]
            if not taken:  # every slot is being loaded
                continue
            try:
                save(i, [page for _, page, _ in taken], [slot for _, _, slot in taken])
            except FatalError:
                raise
            except Exception as e:  # nothing is lost but these pages' copies
                log.warning("saving %d pages of instance %d to the host tier failed (%s)", len(taken), i, e)
                tier.discard([key for key, _, _ in taken])
            tier.stats.save_host_seconds += time.perf_counter() - started

    def keys(self, req: Request, tokens: int) -> list[bytes]:
        """The keys of the full pages among the first `tokens` tokens of the request's sequence (its prompt
        then its sampled tokens), extending the ones computed before."""
        pages = tokens // self.page_size
        if len(req.page_keys) < pages:
            ids = (req.prompt_ids + req.output_ids)[: pages * self.page_size]
            req.page_keys = prefix_keys(ids, self.page_size, self.salt_of(req), req.page_keys)
        return req.page_keys[:pages]

    def salt_of(self, req: Request) -> bytes:
        """The salt of the request's page keys: the model's, and the request's cache_salt if it has one, so
        requests with different cache salts never share a page (their keys differ from the first page)."""
        salt = req.params.cache_salt
        return self.salt if salt is None else self.salt + b"\x00" + salt.encode("utf-8", "surrogatepass")

    def lookup(self, req: Request, instances: Sequence[int]) -> list[int]:
        """Where the request's cached prefix lies: per page of its longest cached prefix, the instance (of
        `instances`) holding it. Leaves at least the last prefill token to compute. A page cached on several
        instances (a popular system prompt) is taken from the one holding the longest run of the request's
        pages from there on, so that its K/V lies on as few instances as possible: every instance holding
        some of it must take part in its decode steps."""
        keys = self.keys(req, req.num_prefill_tokens - 1)
        where: list[int] = []
        current = None
        for k, key in enumerate(keys):
            holders = [i for i in instances if key in self.pools[i].cached]
            if not holders:
                break
            if current not in holders:
                current = max(holders, key=lambda i: (self._run(i, keys, k), -instances.index(i)))
            where.append(current)
        return where

    def _run(self, instance: int, keys: Sequence[bytes], start: int) -> int:
        """How many of keys[start:] the instance caches in a row."""
        cached, n = self.pools[instance].cached, start
        while n < len(keys) and keys[n] in cached:
            n += 1
        return n - start

    def locator(self) -> Callable[[Request, Sequence[int]], list[int]]:
        """`lookup` remembered per request and instances (for one scheduling decision: the pools do not
        change meanwhile)."""
        seen: dict[tuple[int, tuple[int, ...]], list[int]] = {}

        def where(req: Request, instances: Sequence[int]) -> list[int]:
            key = (req.rid, tuple(instances))
            if key not in seen:
                seen[key] = self.lookup(req, instances)
            return seen[key]

        return where

    def attach(
        self,
        work: PrefillWork,
        fresh: Sequence[Request],
        load: Loader | None = None,
        pays: Callable[[int, int, int, int], bool] | None = None,
    ) -> None:
        """Give the requests starting their prefill in this work their prefix cached on the group: shared
        pages, `prefilled` and `cached_tokens` set, and the pass set to compute only the tokens after
        them. If the placement plan no longer fits the group's pools (cached pages nobody held counted as
        free, and the hits now hold them), the new tokens are placed busiest-first, as many as fit: a
        request for which none fit leaves this pass and continues in a later one (a chunked prefill).
        load: with a host tier, loads the pages of a prefix continued there (else they are computed), where
        pays(degree, new tokens, held tokens, tokens to load) says loading beats computing (default: always)."""
        if not self.enabled:
            return
        group, page = work.group, self.page_size
        hits: list[Request] = []
        prefer = {}  # per hit: the group ranks holding its prefix, most pages first
        for req in fresh:
            self.stats.queries += 1
            self.stats.query_tokens += req.prefill_len
            where = self.lookup(req, group)
            req.cached_tokens = 0
            if where:
                prefer[req.rid] = [group.index(i) for i, _ in Counter(where).most_common()]
                keys = self.keys(req, len(where) * page)
                for i in dict.fromkeys(where):
                    numbers = [j for j, w in enumerate(where) if w == i]
                    self.pools[i].share(req.rid, [keys[j] for j in numbers], numbers)
                req.prefilled = req.cached_tokens = len(where) * page
            if load is not None and any(self.tiers[i] is not None for i in group):
                self._reload(work, req, load, pays)
            if req.cached_tokens:
                self.stats.hits += 1
                self.stats.hit_tokens += req.cached_tokens
                hits.append(req)
        if not hits:
            return
        if work.chunk is None:
            work.chunk = [r.prefill_len - r.prefilled for r in work.requests]
        else:
            work.chunk = [min(c, r.prefill_len - r.prefilled) for c, r in zip(work.chunk, work.requests)]
        pools = [self.pools[i] for i in group]
        if _fits(work, pools):
            return
        placed = busiest_first_plan(work.chunk, pools, True, [prefer.get(r.rid, []) for r in work.requests])
        plans = [np.array(p, np.int32) for p in work.plans]
        for plan, req, new in zip(plans, work.requests, placed):
            plan[req.prefilled : req.prefilled + len(new)] = new
        keep = [k for k, new in enumerate(placed) if len(new)]
        work.requests = [work.requests[k] for k in keep]
        work.plans = [plans[k] for k in keep]
        work.chunk = [len(placed[k]) for k in keep]

    def host_run(self, req: Request, start: int, instances: Sequence[int]) -> int:
        """How many pages of the request's prefix (all but its last prefill token) the host tier of one of
        these instances holds in a row from page `start` on (the longest)."""
        return max((n for _, n in self._host_runs(req, start, instances)), default=0)

    def _host_runs(self, req: Request, start: int, instances: Sequence[int]) -> list[tuple[HostTier, int]]:
        tiers = {id(self.tiers[i]): self.tiers[i] for i in instances if self.tiers[i] is not None}
        if not tiers:
            return []
        keys = self.keys(req, req.num_prefill_tokens - 1)
        return [(t, t.run(keys, start)) for t in tiers.values()]

    def _reload(
        self, work: PrefillWork, req: Request, load: Loader, pays: Callable[[int, int, int, int], bool] | None
    ) -> None:
        """Load the pages of the request's prefix that continue in the host tier where its pools' copy ends,
        each onto the group instance its plan gives most of that page's tokens (while it has a free page),
        and count them as held. A load that fails leaves the request computing them: nothing else is lost."""
        page = self.page_size
        keys, first = self.keys(req, req.num_prefill_tokens - 1), req.prefilled // page
        tier, count = max(self._host_runs(req, first, work.group), key=lambda x: x[1])
        new = req.num_prefill_tokens - req.prefilled
        if not count or (pays is not None and not pays(len(work.group), new, req.prefilled, count * page)):
            return
        plan = np.asarray(work.plans[work.requests.index(req)])
        reach = [i for i in work.group if self.tiers[i] is tier]  # a page loads only where its tier is
        placed: dict[int, list[tuple[int, int]]] = {}  # instance -> (page number, pool page) loaded there
        for j in range(first, first + count):
            i = work.group[int(np.bincount(plan[j * page : (j + 1) * page]).argmax())]
            if i not in reach:
                i = max(reach, key=lambda x: self.pools[x].free_pages)
            if self.pools[i].free_pages < 1:
                break  # this page and the ones after it are computed
            slot = self.pools[i].append(req.rid, page, j * page)[0]
            placed.setdefault(i, []).append((j, int(slot) // page))
        loaded = sum(len(p) for p in placed.values())
        if not loaded:
            return
        used = {i: [keys[j] for j, _ in pages] for i, pages in placed.items()}
        slots = {i: tier.pin(used[i]) for i in placed}  # no save reuses them before they are read
        try:
            load({i: ([p for _, p in pages], slots[i]) for i, pages in placed.items()})
        except Exception as e:
            if isinstance(e, FatalError):
                raise
            log.warning("loading request %d's prefix from host memory failed (%s); computing it", req.rid, e)
            for i, pages in placed.items():
                self.pools[i].truncate(req.rid, len(pages) * page)
                self.failed_loads.append(i)
                tier.discard(used[i])
            tier.stats.failed_loads += 1
            return
        finally:
            for taken in slots.values():
                tier.release(taken)
        req.prefilled += loaded * page
        req.cached_tokens = req.prefilled
        tier.stats.loaded_bytes += loaded * tier.page_bytes
        tier.stats.hits += 1
        tier.stats.hit_tokens += loaded * page

    def prefetch(
        self, req: Request, instances: Sequence[int], load: Loader, pays: Callable[[int, int, int, int], bool] | None
    ) -> int:
        """While a request waits: load the pages of its prefix that continue in a host tier where the pools'
        copy ends into one of these instances (the one holding the end of its cached prefix if it can, else the
        one of that tier with the most free pages; at most half its free pages, least recently used cached
        pages evicted for them, never the request's own) and cache them there, so that its prefill finds them
        on the devices; the load runs beside whatever that instance is computing. Returns the pages loaded."""
        if not self.enabled or not instances:
            return 0
        page, where = self.page_size, self.lookup(req, list(range(len(self.pools))))
        first = len(where)
        tier, count = max(self._host_runs(req, first, instances), key=lambda x: x[1], default=(None, 0))
        new = req.num_prefill_tokens - first * page
        if not count or (pays is not None and not pays(1, new, first * page, count * page)):
            return 0
        reach = [i for i in instances if self.tiers[i] is tier]
        target = max(reach, key=lambda i: (bool(where) and where[-1] == i, self.pools[i].free_pages))
        pool, keys = self.pools[target], self.keys(req, req.num_prefill_tokens - 1)
        mine = [j for j, i in enumerate(where) if i == target]
        pool.share(PREFETCH_RID, [keys[j] for j in mine], mine)  # held meanwhile: not evicted for the new pages
        n = min(count, pool.free_pages // 2)
        if n < 1:
            pool.release(PREFETCH_RID)
            return 0
        held = pool.append(PREFETCH_RID, n * page, first * page)
        keys = keys[first : first + n]
        slots = tier.pin(keys)
        try:
            load({target: ((held[::page] // page).tolist(), slots)})
        except Exception as e:
            if isinstance(e, FatalError):
                raise
            log.warning("prefetching request %d's prefix from host memory failed (%s)", req.rid, e)
            pool.release(PREFETCH_RID)
            self.failed_loads.append(target)
            tier.discard(keys)
            tier.stats.failed_loads += 1
            return 0
        finally:
            tier.release(slots)
        for index, key in enumerate(keys):
            pool.publish(PREFETCH_RID, len(mine) + index, key)
        pool.release(PREFETCH_RID)
        tier.stats.loaded_bytes += n * tier.page_bytes
        tier.stats.prefetched_pages += n
        return n

    def publish(self, req: Request, instances: Sequence[int]) -> None:
        """Cache the request's full pages on these instances that hold whole aligned pages of its sequence
        (call only when no program is writing its K/V)."""
        if not self.enabled:
            return
        found = [(i, self.pools[i].aligned_pages(req.rid)) for i in instances if self.pools[i].tokens.get(req.rid)]
        last = max((j for _, pages in found for _, j in pages), default=-1)
        if last < 0:
            return
        keys = self.keys(req, (last + 1) * self.page_size)
        for i, pages in found:
            for k, j in pages:
                if j < len(keys):
                    self.pools[i].publish(req.rid, k, keys[j])

    def flush(self, instances: Sequence[int] | None = None) -> None:
        """Drop the cached pages of these instances (all by default), e.g. after their K/V was lost (the host
        tier keeps its copies: they were saved before)."""
        for i in range(len(self.pools)) if instances is None else instances:
            self.pools[i].flush()

    def cached_pages(self) -> list[int]:
        """Cached pages per instance."""
        return [len(p.cached) for p in self.pools]

    @property
    def evictions(self) -> int:
        return sum(p.evictions for p in self.pools)


def _fits(work: PrefillWork, pools: Sequence[PagePool]) -> bool:
    """Whether every rank has the free pages for the tokens the work's plans give it in this pass."""
    need = [0] * len(pools)
    for req, plan, n in zip(work.requests, work.plans, work.chunk or []):
        counts = np.bincount(np.asarray(plan)[req.prefilled : req.prefilled + n], minlength=len(pools))
        for r, c in enumerate(counts):
            need[r] += pools[r].pages_needed(req.rid, int(c))
    return all(n <= p.free_pages for n, p in zip(need, pools))
