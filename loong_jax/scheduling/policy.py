"""What runs where: the interface every scheduling policy implements, the helpers they share, and a
simple cost-free policy.

Each call partitions the free instances into disjoint groups; a group runs one prefill batch (with a
scale-down placement plan) or one decode step (with a master per request). `IdleFirstPolicy` decodes each
request on the instances holding its KV, prefills on the idle instances (or, when none is idle, pauses
the decode group with the fewest requests for one prefill on its instances), places prompts
busiest-instance-first, spreads masters, and scales up when a master's pool is full. `SharedComputePolicy`
is for instances that share one processor (virtual CPU devices): there, groups running at the same time
only compete for the same cores, so it runs one program at a time and keeps the running requests' KV on
as few instances as possible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from loong_jax.runtime.batching import bucket
from loong_jax.runtime.instances import Group
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.placement import busiest_first_plan
from loong_jax.runtime.request import Request, queue_order
from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork


@dataclasses.dataclass
class SchedulerView:
    """What a policy may look at: queues, per-instance pools, instances in use and the admission budget.

    `decoding` holds the running requests that may decode now (not in a program, no KV on a busy
    instance); `busy` instances are running a program and must not be used.
    """

    waiting: Sequence[Request]
    decoding: Sequence[Request]
    pools: Sequence[PagePool]
    max_num_seqs: int
    max_prefill_tokens: int
    reserved_pages: int
    min_prefill_bucket: int = 16
    busy: frozenset[int] = frozenset()
    num_running: int = 0
    now: float = 0.0
    prefilling: Sequence[Request] = ()  # running requests whose chunked prefill is not complete
    running: Sequence[Request] = ()  # every running request, in a program or not
    stepping: Sequence[tuple[Group, Sequence[Request]]] = ()  # decode steps in flight: group and requests
    cached: Callable[[Request, Sequence[int]], list[int]] | None = None  # see cached_on (None: no prefix cache)
    reloadable: Callable[[Request, int, Sequence[int]], int] | None = None  # see host_pages (None: no host tier)
    decode_steps: int = 1  # steps of each decode launch (a burst)

    def cached_on(self, req: Request, instances: Sequence[int]) -> list[int]:
        """Where a waiting request's longest prefix cached on these instances lies: the instance holding
        each of its pages (a prefill group including them computes only the rest)."""
        return [] if self.cached is None else self.cached(req, instances)

    def cached_pages(self, req: Request, instances: Sequence[int]) -> int:
        """Pages of a waiting request's longest prefix cached on these instances."""
        return len(self.cached_on(req, instances))

    def host_pages(self, req: Request, start: int, instances: Sequence[int]) -> int:
        """Pages of a waiting request's prefix the host tier of these instances holds in a row from page
        `start` on (after the ones cached on instances): a prefill there may load them instead of computing."""
        return 0 if self.reloadable is None else self.reloadable(req, start, instances)

    def rank_token_cap(self, degree: int) -> int:
        """Tokens per rank a prefill of this degree may hold: the largest warmed-up token bucket."""
        return bucket(-(-self.max_prefill_tokens // degree), self.min_prefill_bucket)

    def pages_to_reserve(self, req: Request) -> int:
        return pages_to_reserve(req, self.pools)

    @property
    def total_pages(self) -> int:
        return sum(p.num_pages for p in self.pools)


def pages_to_reserve(req: Request, pools: Sequence[PagePool]) -> int:
    """Pages a request may ever need: prompt and all new tokens, plus a partial page per instance."""
    if req.reserved_pages:  # a preempted request keeps its reservation
        return 0
    return -(-(len(req.prompt_ids) + req.expected_new_tokens) // pools[0].page_size) + len(pools)


class Policy(Protocol):
    def schedule(self, view: SchedulerView) -> Iteration: ...


def longest_prompt(degrees: Sequence[int], num_pages: int, page_size: int) -> int:
    """The longest prompt a prefill group of one of these degrees can hold: its KV must fit the group's
    pools (a partial page per rank). A prompt longer than one pass holds is prefilled in chunks."""
    return max(degrees) * (num_pages - 1) * page_size


def pass_tokens(view: SchedulerView, degree: int) -> int:
    """Most tokens of one prompt a prefill pass of this degree computes (each rank's largest warmed bucket);
    a longer prompt is prefilled in chunks of this size, each appending to the K/V of those before."""
    return degree * view.rank_token_cap(degree)


def chunk_to_fit(view: SchedulerView, work: PrefillWork) -> PrefillWork:
    """A batch of one prompt longer than one pass of its group computes its first chunk now (the rest in
    later passes: `continue_chunks`); batches of several prompts fit one pass already."""
    if len(work.requests) == 1 and work.requests[0].num_prefill_tokens > pass_tokens(view, len(work.group)):
        work.chunk = [pass_tokens(view, len(work.group))]
    return work


def continue_chunks(view: SchedulerView, n: int, aligned: bool) -> list[PrefillWork]:
    """The next pass of each prompt whose chunked prefill is under way, oldest first: on the group its last
    pass ran on when all of it is free, else on the (aligned) group of the instances holding its K/V, grown
    by a free instance when those have no room left; it computes what one pass of the group holds and its
    free pages take, placed where its K/V lies, then busiest-first. A prompt whose group is busy, or has no
    room yet anywhere, waits."""
    taken = set(view.busy)
    out = []
    for req in sorted(view.prefilling, key=queue_order):
        held = holders(view, req)
        group = req.prefill_group
        if not group or taken.intersection(group) or not held <= set(group):
            group = aligned_block(sorted(held), n) if aligned else tuple(sorted(held))
        if not group or taken.intersection(group):
            continue
        if not any(view.pools[i].free_pages for i in group):  # full: take in the nearest free instance with room
            spare = [i for i in range(n) if i not in taken and i not in group and view.pools[i].free_pages]
            for i in sorted(spare, key=lambda i: min(abs(i - j) for j in group)):
                grown = aligned_block(sorted({*group, i}), n) if aligned else tuple(sorted({*group, i}))
                if not taken.intersection(grown):
                    group = grown
                    break
        pools = [view.pools[i] for i in group]
        room = sum(p.free_pages for p in pools) * pools[0].page_size
        k = min(req.prefill_len - req.prefilled, pass_tokens(view, len(group)), room)
        if k < 1:
            continue
        plan = np.zeros(req.prefill_len, np.int32)
        mine = [group.index(i) for i in sorted(held, key=lambda i: -view.pools[i].tokens[req.rid])]
        plan[req.prefilled : req.prefilled + k] = busiest_first_plan([k], pools, prefer=[mine])[0]
        out.append(PrefillWork(tuple(group), [req], [plan], chunk=[k]))
        taken.update(group)
    return out


def prefill_degrees(n: int, aligned: bool) -> list[int]:
    """Degrees a prefill group may have: aligned power-of-two blocks, or any number of instances."""
    return [1 << k for k in range(n.bit_length())] if aligned else list(range(1, n + 1))


def holders(view: SchedulerView, req: Request) -> set[int]:
    return {i for i, p in enumerate(view.pools) if p.tokens.get(req.rid, 0)}


def aligned_block(members: Sequence[int], n: int) -> Group:
    """Smallest aligned power-of-two block of instances containing all members (clipped to n)."""
    lo, hi = min(members), max(members)
    size = 1
    while lo // size != hi // size:
        size *= 2
    start = lo // size * size
    return tuple(range(start, min(start + size, n)))


def decode_groups(view: SchedulerView, n: int, aligned: bool) -> list[tuple[Group, list[Request]]]:
    """Connected sets of instances holding the decoding requests' KV (grown to aligned blocks if asked);
    groups touching a busy instance are left out (they wait for it)."""
    comps: list[tuple[set[int], list[Request]]] = []
    for req in view.decoding:
        merged, reqs = holders(view, req) or {0}, [req]
        for comp in [c for c in comps if c[0] & merged]:
            comps.remove(comp)
            merged |= comp[0]
            reqs += comp[1]
        comps.append((merged, reqs))
    changed = aligned
    while changed:
        changed = False
        comps = [(set(aligned_block(sorted(c), n)), r) for c, r in comps]
        for a in range(len(comps)):
            for b in range(a + 1, len(comps)):
                if comps[a][0] & comps[b][0]:
                    comps[a] = (comps[a][0] | comps[b][0], comps[a][1] + comps[b][1])
                    del comps[b]
                    changed = True
                    break
            if changed:
                break
    groups = [(tuple(sorted(c)), sorted(r, key=lambda q: q.rid)) for c, r in comps]
    return [g for g in groups if not view.busy.intersection(g[0])]


def grow_full_groups(view: SchedulerView, groups: list, n: int) -> list:
    """Aligned groups grow by whole blocks: a group with a request that has no room on its instances takes
    the aligned block that adds a free instance, absorbing the decode groups inside that block."""

    def full(group: Group, req: Request) -> bool:
        return all(view.pools[i].pages_needed(req.rid, 1) > view.pools[i].free_pages for i in group)

    changed = True
    while changed:
        changed = False
        used = {i for g, _ in groups for i in g} | set(view.busy)
        free = [i for i in range(n) if i not in used and view.pools[i].free_pages > 0]
        for g, reqs in groups:
            if not free or not any(full(g, r) for r in reqs):
                continue
            near = min(free, key=lambda i: min(abs(i - j) for j in g))
            block = set(aligned_block(sorted(set(g) | {near}), n))
            if block & set(view.busy):
                continue
            inside = [x for x in groups if block & set(x[0])]
            merged = sorted((r for _, rs in inside for r in rs), key=lambda q: q.rid)
            groups = [x for x in groups if x not in inside] + [(tuple(sorted(block)), merged)]
            changed = True
            break
    return groups


def assign_masters(
    view: SchedulerView, n: int, group: Group, reqs: list[Request], taken: set[int], aligned: bool
) -> tuple[DecodeWork, list[Request]]:
    """Pick each request's master: a holder with room, else any group instance with room (scale-up), else
    a free instance that joins the group. Masters are spread: fewest assigned first. Returns the decode
    work and the requests that found no room anywhere this step."""
    free = {i: view.pools[i].free_pages for i in range(n)}
    load = {i: 0 for i in range(n)}
    members = list(group)
    masters: list[int] = []
    kept: list[Request] = []
    stuck: list[Request] = []

    def room(i: int, req: Request) -> bool:
        return view.pools[i].pages_needed(req.rid, 1) <= free[i]

    for req in reqs:
        have = [i for i in members if view.pools[i].tokens.get(req.rid, 0)]
        options = [i for i in have if room(i, req)] or [i for i in members if room(i, req)]
        if not options:
            spare = [i for i in range(n) if i not in taken and i not in members and room(i, req)]
            if spare:
                grown = set(members) | {spare[0]}
                if aligned:
                    grown = set(aligned_block(sorted(grown), n))
                if not grown & (taken - set(members)):
                    members = sorted(grown)
                    options = [i for i in members if room(i, req)]
        if not options:
            stuck.append(req)  # nowhere to put its next token this step: it waits
            continue
        best = min(options, key=lambda i: (load[i], -free[i], i))
        load[best] += 1
        free[best] -= view.pools[best].pages_needed(req.rid, 1)
        masters.append(best)
        kept.append(req)
    # a structured output's next mask comes from the host after each token: such a batch takes single steps
    steps = 1 if any(r.params.structured_output is not None for r in kept) else burst_steps(view)
    return DecodeWork(tuple(members), kept, [members.index(m) for m in masters], steps), stuck


def burst_steps(view: SchedulerView) -> int:
    """Steps of the next decode launches: the longest burst (`decode_steps`: the host reads, streams and
    schedules once per burst) unless a chunked prefill is under way or a prompt is waiting that could start
    once instances are free (the head of the queue is within max_num_seqs, the reservation budget and the
    free pages): then single steps, so that the scheduler decides again after each token and a waiting
    prompt is delayed by no more than the bursts already running when it arrived. A prompt waiting for
    memory gets it sooner from bursts (the running requests finish sooner)."""
    if view.decode_steps == 1 or view.prefilling:
        return 1
    if view.waiting and view.num_running < view.max_num_seqs:
        head = min(view.waiting, key=queue_order)
        free = sum(p.free_pages for p in view.pools)
        prompt_pages = -(-head.num_prefill_tokens // view.pools[0].page_size) + 1
        if view.reserved_pages + view.pages_to_reserve(head) <= view.total_pages and prompt_pages <= free:
            return 1
    return view.decode_steps


def fits_rank_cap(view: SchedulerView, lengths: Sequence[int], d: int) -> bool:
    """Whether a batch's striped tokens, and its sampled rows, stay within the largest warmed bucket."""
    cap = view.rank_token_cap(d)
    ranks = np.arange(d)
    stripe = sum((n - ranks + d - 1).clip(min=0) // d for n in lengths)
    samplers = sum((ranks == (n - 1) % d).astype(np.int64) for n in lengths)
    return bool(np.max(stripe) <= cap and np.max(samplers) * view.min_prefill_bucket <= cap)


def admit_fcfs(
    view: SchedulerView,
    group: Group,
    plan: Callable[[Sequence[int], Sequence[PagePool]], list[np.ndarray]],
    reserve: Callable[[Request], int] | None = None,
    budget: int | None = None,
) -> PrefillWork | None:
    """The longest FCFS prefix of the queue that fits: sequences, prefill tokens, memory (growth reserved
    against `budget` pages, the whole pool by default) and the group's free pages."""
    pools = [view.pools[i] for i in group]
    page = pools[0].page_size
    free = sum(p.free_pages for p in pools)
    reserve = reserve or view.pages_to_reserve
    reserved = view.reserved_pages if budget is None else 0
    budget = view.total_pages if budget is None else budget
    tokens, batch = 0, []
    for req in view.waiting:
        n = req.num_prefill_tokens
        if view.num_running + len(batch) >= view.max_num_seqs:
            break
        lengths = [r.num_prefill_tokens for r in batch] + [n]
        if batch and (tokens + n > view.max_prefill_tokens or not fits_rank_cap(view, lengths, len(group))):
            break
        need = reserve(req)
        prompt_pages = -(-n // page) + len(group)
        if reserved + need > budget or prompt_pages > free:
            break
        batch.append(req)
        reserved, tokens, free = reserved + need, tokens + n, free - prompt_pages
    if not batch:
        return None
    return PrefillWork(group, batch, plan([r.num_prefill_tokens for r in batch], pools))


class IdleFirstPolicy:
    """A simple policy (see module docstring), kept as a baseline. With `aligned_groups`, every group is an
    aligned power-of-two block of instances, which bounds the device sets to compile for (2N - 1)."""

    def __init__(self, num_instances: int, aligned_groups: bool = True):
        self.n = num_instances
        self.aligned = aligned_groups

    def schedule(self, view: SchedulerView) -> Iteration:
        chunks = continue_chunks(view, self.n, self.aligned)  # prompts under way first, then the rest
        view = dataclasses.replace(view, busy=view.busy | {i for w in chunks for i in w.group})
        groups = decode_groups(view, self.n, self.aligned)
        if self.aligned:
            groups = grow_full_groups(view, groups, self.n)
        busy = {i for g, _ in groups for i in g} | view.busy
        idle = [i for i in range(self.n) if i not in busy]
        it = Iteration(prefills=chunks)
        work = None
        if view.waiting:
            if idle:
                work = admit_fcfs(view, self._prefill_group(idle), busiest_first_plan)
            elif groups:  # no idle instance: pause the lightest decode group for one prefill on its instances
                group, _ = min(groups, key=lambda g: (len(g[1]), -len(g[0])))
                work = admit_fcfs(view, group, busiest_first_plan)
                if work is not None:
                    groups = [g for g in groups if g[0] != group]
            if work is not None:
                it.prefills.append(chunk_to_fit(view, work))
        taken = set(it.instances()) | set(view.busy) | {i for g, _ in groups for i in g}
        for group, reqs in groups:
            it.decodes.append(assign_masters(view, self.n, group, reqs, taken, self.aligned)[0])
            taken |= set(it.decodes[-1].group)
        return it

    def max_prompt_tokens(self, num_pages: int, page_size: int) -> int:
        return longest_prompt(prefill_degrees(self.n, self.aligned), num_pages, page_size)

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


def preempt_if_out_of_memory(view: SchedulerView, work: DecodeWork, stuck: Sequence[Request]) -> Request | None:
    """When a decoding request found no room and every pool is full, the request to preempt (recomputed
    later): lowest priority, then newest; it is taken out of the decode work."""
    if not stuck or any(p.free_pages for p in view.pools):
        return None
    victim = min([*work.requests, *stuck], key=lambda r: (r.priority, -r.arrival, -r.rid))
    if victim in work.requests:
        k = work.requests.index(victim)
        del work.requests[k], work.masters[k]
    return victim


class SharedComputePolicy:
    """One program at a time, for instances that share one processor (virtual CPU devices).

    Parallel groups buy nothing there: k programs at once each run about k times slower, and every decode
    group reads its instance's own copy of the weights. So this is the elastic runtime at its degenerate
    optimum: waiting requests are prefilled first (degree 1) on the busiest instance that has room, so the
    running requests' KV stays on the fewest instances, and all decoding requests step as one batch on the
    (aligned) group of instances holding their KV, which is one instance until its pool is full.
    """

    def __init__(self, num_instances: int):
        self.n = num_instances

    @staticmethod
    def max_prompt_tokens(num_pages: int, page_size: int) -> int:
        return longest_prompt([1], num_pages, page_size)  # one instance

    def schedule(self, view: SchedulerView) -> Iteration:
        it = Iteration()
        if view.busy:  # a program is running: it has the whole processor
            return it
        it.prefills = continue_chunks(view, self.n, aligned=True)[:1]  # a prompt under way goes on first
        if it.prefills:
            return it
        if view.waiting:
            head = view.waiting[0]  # where its cached prefix lies first, then the busiest
            order = sorted(range(self.n), key=lambda i: (-view.cached_pages(head, [i]), -view.pools[i].used_tokens, i))
            for home in order:
                work = admit_fcfs(view, (home,), busiest_first_plan)
                if work is not None:
                    it.prefills.append(chunk_to_fit(view, work))
                    return it
        if not view.decoding:
            return it
        held = set().union(*(holders(view, r) for r in view.decoding)) or {0}
        group = aligned_block(sorted(held), self.n)
        work, stuck = assign_masters(view, self.n, group, list(view.decoding), set(), aligned=True)
        victim = preempt_if_out_of_memory(view, work, stuck)
        if victim is not None:
            it.preempt.append(victim)
        if work.requests:
            it.decodes.append(work)
        return it
