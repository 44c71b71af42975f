"""The elastic scheduler (the global manager): every call decides what the free instances run next.

Four steps (DESIGN.md 2.4), all priced by the cost model:
1. Dispatch: waiting requests by priority then arrival, with bounded skipping ahead of a request that does
   not fit, admitted only if their KV including growth to max_tokens fits the pool (memory-safe).
2. Instance allocation: the admitted requests get the idle instances; a decode group is paused for them
   when the latency the new requests save (normalised by input length; with `weigh_queue`, also the
   requests queued behind them, which start that much sooner too) exceeds the latency the paused decodes
   lose (normalised by output length), or, with latency targets (`SLO`), when the pause lets the
   shortest admitted requests still meet their time to first token while every paused decode keeps its
   time per output token (the pause is then for those requests only); with `wait_for_steps` a group in
   the middle of a decode step may be chosen too, and the prefill waits for that step to end (decode
   groups step asynchronously, so otherwise a prefill only ever sees one free group). With `pause_later`,
   the alternative to pausing a free group is also pausing a group in flight when its step ends, so the
   pause goes to the group whose decodes lose least rather than to whichever step ended first. Or a group
   is packed onto fewer instances by migrating KV when the faster prefill is worth the migration time.
3. Batching: a request whose cached prefix lies on free instances is batched on them when computing only
   its new tokens there beats computing all of it on every free instance (a prefix's K/V does not move);
   a dynamic program over the other admitted requests sorted by length and the instances left sorted by
   free memory splits them into prefill batches with a degree each, minimising the sum of
   input-length-normalised prefill latencies subject to memory.
4. Scaling plan: busiest-first scale-down placement for every prefill batch; masters and scale-up for
   every decode group. Running out of memory anyway (admission without growth) preempts the newest
   lowest-priority request for recomputation.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np

from loong_jax.runtime.instances import Group
from loong_jax.runtime.placement import busiest_first_plan, least_loaded_plan
from loong_jax.runtime.request import Request, queue_order
from loong_jax.runtime.work import Iteration, Migration, PrefillWork
from loong_jax.scheduling.cost_model import CostModel
from loong_jax.scheduling.policy import (
    SchedulerView,
    aligned_block,
    assign_masters,
    chunk_to_fit,
    continue_chunks,
    decode_groups,
    fits_rank_cap,
    grow_full_groups,
    longest_prompt,
    preempt_if_out_of_memory,
    prefill_degrees,
)


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency targets: TTFT <= max(ttft_scale x the request's prefill alone on every instance, ttft_floor)
    seconds and TPOT <= tpot seconds."""

    ttft_scale: float
    ttft_floor: float
    tpot: float


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    window: int = 64  # waiting requests looked at per decision
    max_batch_requests: int | None = None  # requests admitted per decision (None: one prefill pass per instance)
    max_skips: int = 8  # times a request may be passed by later ones before it blocks the queue
    aligned_groups: bool = True  # groups are aligned power-of-two blocks (bounded programs to compile)
    pack_decodes: bool = False  # allow migrating decode KV to free instances for prefill
    pause_decodes: bool = True
    pause_weight: float = 1.0  # pause when the saved latency exceeds this times the added latency
    placement: str = "busiest"  # scale-down plan: "busiest" (paper default) or "least_loaded"
    decode_step_target: float | None = None  # seconds: spread a request's KV until its decode steps meet this
    defer_long: bool = False  # the batching may leave the longest admitted requests for the next batches
    slo: SLO | None = None  # also pause decodes when that saves a time to first token within these targets
    wait_for_steps: bool = False  # a prefill may wait for decode steps in flight to end and pause those groups
    pause_later: bool = False  # not pausing now may mean pausing a group in flight when its step ends
    weigh_queue: bool = True  # a pause also counts what it saves the requests waiting behind the admitted ones


PLANS = {"busiest": busiest_first_plan, "least_loaded": least_loaded_plan}


def _pages(tokens: int, page: int) -> int:
    return -(-tokens // page)


class ElasticScheduler:
    """Implements the `Policy` interface with the cost model's predictions."""

    def __init__(self, num_instances: int, cost: CostModel, config: SchedulerConfig | None = None):
        self.n = num_instances
        self.cost = cost
        self.cfg = config or SchedulerConfig()
        self._cached: dict[int, int] = {}  # request id -> cached prefix tokens (this decision's admitted)
        self._reload: dict[int, float] = {}  # request id -> seconds to load the host tier's part of them

    # ----- the decision ----------------------------------------------------------------------------

    def schedule(self, view: SchedulerView) -> Iteration:
        aligned = self.cfg.aligned_groups
        chunks = continue_chunks(view, self.n, aligned)  # prompts prefilled in chunks go on first
        view = dataclasses.replace(view, busy=view.busy | {i for w in chunks for i in w.group})
        groups = decode_groups(view, self.n, aligned)
        if aligned:
            groups = grow_full_groups(view, groups, self.n)
        in_decode = {i for g, _ in groups for i in g}
        idle = [i for i in range(self.n) if i not in view.busy and i not in in_decode]
        it = Iteration(prefills=chunks)
        admitted, blocked = self._dispatch(view, idle + sorted(in_decode))
        # tokens of each admitted request's longest cached prefix
        self._cached, self._reload = {}, {}
        for r in admitted:
            self._prefix_tokens(view, r, range(self.n))
        if admitted:
            paused, packed, hold, now = self._allocate(view, admitted, idle, groups)
            if hold:  # the prefill waits for decode steps in flight; the groups it pauses stay still
                held = {i for g in paused for i in g[0]}
                groups = [g for g in groups if not held.intersection(g[0])]
            elif packed:  # migrations this turn; the freed instance takes the prefill next turn
                it.migrations = packed
                moved = {i for m in packed for i in (m.src, m.dst)}
                groups = [g for g in groups if not moved.intersection(g[0])]
            else:
                free = idle + [i for g in paused for i in g[0]]
                batches, rest, free = self._pin(view, now, free)
                batches += self._batch(view, rest, free)
                for group, reqs in batches:
                    it.prefills.append(chunk_to_fit(view, PrefillWork(group, reqs, self._plans(view, group, reqs))))
                used = {i for w in it.prefills for i in w.group}
                groups = [g for g in groups if not used.intersection(g[0])]
                launched = [r for w in it.prefills for r in w.requests]
                left = [r for r in admitted if all(r is not x for x in launched)]
                self._count_skips(blocked + left, launched)
        taken = set(it.instances()) | set(view.busy) | {i for g, _ in groups for i in g}
        for group, reqs in groups:
            work, stuck = assign_masters(view, self.n, group, reqs, taken, aligned)
            victim = preempt_if_out_of_memory(view, work, stuck)
            if victim is not None:
                it.preempt.append(victim)
            if work.requests:
                it.decodes.append(work)
                taken |= set(work.group)
        return it

    # ----- step 1: dispatch --------------------------------------------------------------------------

    def _dispatch(self, view: SchedulerView, usable: Sequence[int]) -> tuple[list[Request], list[Request]]:
        """Admissible waiting requests in order, as many as one prefill pass per usable instance takes (the
        rest could not start now anyway), and the ones passed over (for bounded skipping)."""
        cfg = self.cfg
        page = view.pools[0].page_size
        order = sorted(view.waiting[: cfg.window * 4], key=queue_order)
        reserved, total = view.reserved_pages, view.total_pages
        free = sum(view.pools[i].free_pages for i in usable)
        room = view.max_num_seqs - view.num_running
        if cfg.max_batch_requests is not None:
            room = min(room, cfg.max_batch_requests)
        tokens = view.max_prefill_tokens * max(1, len(usable))
        admitted: list[Request] = []
        blocked: list[Request] = []
        for req in order[: cfg.window]:
            if len(admitted) >= room or (admitted and req.num_prefill_tokens > tokens):
                break
            need = view.pages_to_reserve(req)
            prompt = _pages(req.num_prefill_tokens, page) + 1
            if reserved + need <= total and prompt <= free:
                admitted.append(req)
                reserved, free, tokens = reserved + need, free - prompt, tokens - req.num_prefill_tokens
            else:
                blocked.append(req)
                if req.skipped >= cfg.max_skips:
                    break  # it has waited long enough: nobody passes it any more
        return admitted, blocked

    @staticmethod
    def _count_skips(blocked: list[Request], launched: list[Request]) -> None:
        for b in blocked:
            if any(queue_order(r) > queue_order(b) for r in launched):
                b.skipped += 1

    # ----- step 2: instance allocation ------------------------------------------------------------

    def _norm(self, reqs: Sequence[Request], inputs: bool) -> float:
        if inputs:
            return sum(1.0 / max(1, r.num_prefill_tokens) for r in reqs)
        return sum(1.0 / max(1, r.expected_new_tokens) for r in reqs)

    def _prefix_tokens(self, view: SchedulerView, req: Request, instances: Sequence[int]) -> None:
        """Note the tokens of the request's prefix a prefill on these instances will not compute: those cached
        there, and those after them in the host tier when loading them is predicted faster than computing
        them (with the time their load adds)."""
        page = view.pools[0].page_size
        pages = view.cached_pages(req, instances)
        host = view.host_pages(req, pages, instances) * page
        n, h = req.num_prefill_tokens - pages * page, pages * page
        self._cached[req.rid], self._reload[req.rid] = h, 0.0
        if host and self.cost.reload_pays(max(1, len(instances)), n, h, host):
            self._cached[req.rid], self._reload[req.rid] = h + host, self.cost.reload_time(host)

    def _prefill_time(self, degree: int, reqs: Sequence[Request]) -> float:
        """Predicted prefill of these requests at this degree; a cached prefix is not computed again."""
        cached = [self._cached.get(r.rid, 0) for r in reqs]
        reload = sum(self._reload.get(r.rid, 0.0) for r in reqs)
        return reload + self.cost.prefill_time(degree, [r.num_prefill_tokens - h for r, h in zip(reqs, cached)], cached)

    def _step_time(self, group: Group, reqs: Sequence[Request]) -> float:
        return self.cost.decode_time(len(group), len(reqs), sum(r.num_tokens for r in reqs))

    def _allocate(
        self, view: SchedulerView, admitted: list[Request], idle: list[int], groups: list
    ) -> tuple[list, list[Migration], bool, list[Request]]:
        """Decode groups to pause for the prefill, or migrations that free one decode instance for it; whether
        the prefill waits for paused groups whose decode step is still in flight (hold); and the admitted
        requests to prefill now (with latency targets, a pause may be for the shortest of them only)."""
        batch = admitted
        gain_w = self._norm(admitted, inputs=True)
        behind_w = self._norm(self._behind(view, admitted), inputs=True) if self.cfg.weigh_queue else 0.0
        drain = 0.0
        if idle:
            latency = self._prefill_time(len(idle), batch)
        elif groups:  # no idle instance: the new requests wait for the first decode group to drain
            drain = min(
                max(r.expected_new_tokens - len(r.output_ids) for r in reqs) * self._step_time(g, reqs)
                for g, reqs in groups
            )
            latency = drain + self._prefill_time(1, batch)
        else:
            return [], [], False, admitted
        paused: list = []
        hold = False
        now = sorted(admitted, key=lambda r: r.num_prefill_tokens) if self.cfg.slo else admitted
        if self.cfg.pause_decodes:
            options = [(g, reqs, 0.0) for g, reqs in groups]
            if self.cfg.wait_for_steps:
                options += [(tuple(g), list(reqs), self._step_time(g, reqs)) for g, reqs in view.stepping]
            size, wait = len(idle), 0.0
            waiting = latency * gain_w  # the admitted requests' normalised latency if nothing is paused now
            if self.cfg.pause_later and not idle:
                waiting = min([waiting] + [self._pause_later(g, reqs, batch, gain_w) for g, reqs in view.stepping])
            for g, reqs, ends in sorted(options, key=lambda o: (o[2] > 0, self._norm(o[1], inputs=False), -len(o[0]))):
                with_g = max(wait, ends) + self._prefill_time(size + len(g), batch)
                gain = waiting - with_g * gain_w + (latency - with_g) * behind_w
                cost = with_g * self._norm(reqs, inputs=False)
                k = len(now) if gain > cost * self.cfg.pause_weight else 0
                if self.cfg.slo and not k:
                    k, with_g = self._slo_pause(view, now, g, reqs, size, max(wait, ends), drain if not size else wait)
                if k:
                    paused.append((g, reqs))
                    now = now[:k]
                    batch = now
                    size, latency, wait = size + len(g), with_g, max(wait, ends)
                    waiting = latency * gain_w
                    hold = hold or ends > 0
        if paused or not self.cfg.pack_decodes or not idle:
            return paused, [], hold, now
        return [], self._pack(view, batch, gain_w, latency, len(idle), groups), False, admitted

    def _behind(self, view: SchedulerView, admitted: list[Request]) -> list[Request]:
        """Waiting requests after the admitted ones that could still join the running batch (max_num_seqs):
        a pause that starts the admitted requests sooner starts these sooner too."""
        room = view.max_num_seqs - view.num_running - len(admitted)
        taken = {r.rid for r in admitted}
        return [r for r in view.waiting[: self.cfg.window] if r.rid not in taken][: max(0, room)]

    def _slo_pause(
        self,
        view: SchedulerView,
        now: list[Request],
        group: Group,
        reqs: Sequence[Request],
        size: int,
        start: float,
        base_wait: float,
    ) -> tuple[int, float]:
        """With latency targets: the most of the shortest admitted requests (`now`, sorted) that pausing the
        group lets meet their TTFT while its decodes keep their TPOT, and that prefill's end; (0, 0.0) if none.
        The prefill starts at `start` on size + len(group) instances; without the pause it would start after
        `base_wait` on the `size` instances already chosen (or on one drained instance if none)."""
        step = self._step_time(group, reqs)
        for j in range(len(now), 0, -1):
            base = base_wait + self._prefill_time(size or 1, now[:j])
            with_j = start + self._prefill_time(size + len(group), now[:j])
            if self._ttft_helped(view, now[:j], base, with_j) and self._tpot_kept(view, reqs, with_j, step):
                return j, with_j
        return 0, 0.0

    def _pause_later(self, group: Group, reqs: Sequence[Request], batch: Sequence[Request], gain_w: float) -> float:
        """Normalised cost of not pausing now but pausing a group whose decode step is in flight when that step
        ends: the admitted requests wait for the step, and that group's decodes wait for the prefill."""
        prefill = self._prefill_time(len(group), batch)
        return (self._step_time(group, reqs) + prefill) * gain_w + prefill * self._norm(reqs, inputs=False)

    def _ttft_helped(self, view: SchedulerView, admitted: list[Request], latency: float, faster: float) -> bool:
        """With latency targets: the faster start lets an admitted request still meet its TTFT target."""
        slo = self.cfg.slo
        if slo is None or faster >= latency:
            return False
        for r in admitted:
            target = max(slo.ttft_scale * self.cost.prefill_time(self.n, [r.num_prefill_tokens]), slo.ttft_floor)
            if view.now - r.arrival + faster <= target:
                return True
        return False

    def _tpot_kept(self, view: SchedulerView, reqs: Sequence[Request], delay: float, step: float) -> bool:
        """With latency targets: every request still meets its TPOT target after waiting `delay` seconds and
        decoding its remaining tokens at `step` seconds each."""
        slo = self.cfg.slo
        if slo is None:
            return False
        for r in reqs:
            left = r.expected_new_tokens - len(r.output_ids)
            elapsed = view.now - (r.first_token_time if r.first_token_time is not None else view.now)
            if (elapsed + delay + left * step) / max(1, r.expected_new_tokens - 1) > slo.tpot:
                return False
        return True

    def _pack(
        self, view: SchedulerView, batch: list[Request], gain_w: float, latency: float, n_idle: int, groups: list
    ) -> list[Migration]:
        """Free the instance holding the least KV of a multi-instance decode group by moving that KV to the
        group instance with the most room (one transfer), if the faster prefill is worth the move."""
        for group, reqs in groups:
            if len(group) < 2:
                continue
            src = min(group, key=lambda i: view.pools[i].used_tokens)
            dst = max((i for i in group if i != src), key=lambda i: view.pools[i].free_pages)
            held = {r.rid: view.pools[src].tokens.get(r.rid, 0) for r in reqs}
            moving = [r for r in reqs if held[r.rid]]
            tokens = sum(held.values())
            pool = view.pools[dst]
            if not moving or sum(pool.pages_needed(r.rid, held[r.rid]) for r in moving) > pool.free_pages:
                continue
            move = self.cost.migrate_time(tokens)
            faster = move + self._prefill_time(n_idle + 1, batch)
            if (latency - faster) * gain_w > move * self._norm(reqs, inputs=False):
                return [Migration(r.rid, src, dst, held[r.rid]) for r in moving]
        return []

    # ----- step 3: batching ------------------------------------------------------------------------

    def _pin(
        self, view: SchedulerView, admitted: list[Request], free: list[int]
    ) -> tuple[list[tuple[Group, list[Request]]], list[Request], list[int]]:
        """Prefill batches of requests whose cached prefix lies on free instances, on those instances: a
        request joins the batch of the (aligned) block holding its prefix pages when computing only its new
        tokens there is predicted faster than computing its whole prompt on every free instance (its prefix
        is useless elsewhere: K/V never moves for a prefill). Returns those batches, the other requests and
        the instances left for them."""
        page = view.pools[0].page_size
        left = set(free)
        homes: dict[Group, list[Request]] = {}
        for req in admitted:
            where = set(view.cached_on(req, range(self.n)))
            if not where:
                continue
            home = aligned_block(sorted(where), self.n) if self.cfg.aligned_groups else tuple(sorted(where))
            if not left.issuperset(home):
                continue
            n, h = req.num_prefill_tokens, len(view.cached_on(req, home)) * page
            if self.cost.prefill_time(len(home), [n - h], [h]) < self.cost.prefill_time(len(free), [n]):
                homes.setdefault(home, []).append(req)
        groups: list[tuple[set[int], list[Request]]] = []  # overlapping homes merged (nested aligned blocks)
        for home, reqs in sorted(homes.items(), key=lambda kv: -len(kv[0])):
            inside = [g for g in groups if g[0] & set(home)]
            merged = set(home).union(*(g[0] for g in inside))
            groups = [g for g in groups if g not in inside] + [(merged, [r for g in inside for r in g[1]] + reqs)]
        batches, pinned = [], set()
        for members, reqs in groups:
            group = tuple(sorted(members))
            if self.cfg.aligned_groups:
                group = aligned_block(group, self.n)
            if not left.issuperset(group):
                continue
            room = sum(view.pools[i].free_pages for i in group)
            batch, new, pages = [], [], 0
            for req in sorted(reqs, key=queue_order):
                n = req.num_prefill_tokens - len(view.cached_on(req, group)) * page
                if sum(new) + n > view.max_prefill_tokens or not fits_rank_cap(view, new + [n], len(group)):
                    continue
                if pages + _pages(n, page) + len(group) > room:
                    continue
                batch.append(req)
                new.append(n)
                pages += _pages(n, page) + len(group)
            if batch:
                batches.append((group, batch))
                pinned.update(r.rid for r in batch)
                left -= set(group)
        rest = [r for r in admitted if r.rid not in pinned]
        remaining = [i for i in free if i in left]
        for r in rest:  # the rest can only find what is cached on the instances left (or in host memory)
            self._prefix_tokens(view, r, remaining)
        return batches, rest, remaining

    def max_prompt_tokens(self, num_pages: int, page_size: int) -> int:
        return longest_prompt(prefill_degrees(self.n, self.cfg.aligned_groups), num_pages, page_size)

    def _degrees(self, e: int) -> list[int]:
        ds = {1 << k for k in range(e.bit_length()) if 1 << k <= e}
        if not self.cfg.aligned_groups:
            ds.add(e)
        return sorted(ds)

    def _batch(self, view: SchedulerView, admitted: list[Request], free: list[int]) -> list[tuple[Group, list]]:
        """Split the admitted requests into prefill batches with a degree each (dynamic program), then
        place every batch on concrete instances."""
        if not free or not admitted:
            return []
        page = view.pools[0].page_size
        order = sorted(free, key=lambda i: (view.pools[i].free_pages, i))  # least free memory first
        reqs = sorted(admitted, key=lambda r: r.num_prefill_tokens)
        lens = np.array([r.num_prefill_tokens for r in reqs], np.float64)
        hit = np.array([self._cached.get(r.rid, 0) for r in reqs], np.float64)
        new = lens - hit  # tokens computed; their attention also covers the cached ones
        r_n, e_n = len(reqs), len(order)
        degrees = np.array(self._degrees(e_n))
        coeffs = np.array([self.cost.coefficients(self.cost.prefill, int(k)) for k in degrees])  # [K, 4]
        caps = np.array([view.rank_token_cap(int(k)) for k in degrees], np.float64)
        p1 = np.concatenate([[0.0], np.cumsum(new)])
        p2 = np.concatenate([[0.0], np.cumsum(new**2)])
        p3 = np.concatenate([[0.0], np.cumsum(new * hit)])
        ph = np.concatenate([[0.0], np.cumsum(hit)])
        pw = np.concatenate([[0.0], np.cumsum(1.0 / lens)])
        pr = np.concatenate([[0.0], np.cumsum([self._reload.get(r.rid, 0.0) for r in reqs])])  # host tier loads
        pp = np.concatenate([[0.0], np.cumsum(np.ceil(lens / page))])
        cap_pages = np.concatenate([[0.0], np.cumsum([view.pools[i].free_pages for i in order])])
        e_idx = np.arange(e_n + 1)
        src = e_idx[None, :] - degrees[:, None]  # [K, E+1]: instances used before this batch
        ok_e = src >= 0
        src_c = np.clip(src, 0, None)
        window_pages = cap_pages[e_idx][None, :] - cap_pages[src_c]  # free pages of the batch's instances
        f = np.full((r_n + 1, e_n + 1), np.inf)
        f[0, 0] = 0.0
        back = np.zeros((r_n + 1, e_n + 1, 2), np.int64)
        for i in range(1, r_n + 1):
            j = np.arange(i)
            s1, s2, s3, w = p1[i] - p1[j], p2[i] - p2[j], p3[i] - p3[j], pw[i] - pw[j]  # [J]
            cnt = i - j
            padded = np.stack([self.cost.prefill_tokens(int(k), s1) for k in degrees], axis=1)  # [J, K]
            held = np.stack(
                [self.cost.held_pairs(int(k), padded[:, x], ph[i] - ph[j], s3) for x, k in enumerate(degrees)], axis=1
            )
            t = coeffs[None, :, 0] + coeffs[None, :, 1] * padded + coeffs[None, :, 2] * s2[:, None]
            t = t + coeffs[None, :, 3] * held + (pr[i] - pr[j])[:, None]
            cost = t * w[:, None]
            within = np.ceil(s1[:, None] / degrees[None, :]) + cnt[:, None] <= caps[None, :]
            fits = (within | (cnt[:, None] == 1)) & (cnt[:, None] <= view.max_num_seqs)  # one alone may exceed
            need = (pp[i] - pp[j])[:, None, None] + cnt[:, None, None] + degrees[None, :, None]  # [J, K, 1]
            cand = f[j][:, src_c] + cost[:, :, None]  # [J, K, E+1]
            ok = ok_e[None] & fits[:, :, None] & (need <= window_pages[None])
            cand = np.where(ok, cand, np.inf)
            flat = cand.reshape(-1, e_n + 1)
            best = flat.argmin(axis=0)
            f[i] = flat[best, e_idx]
            back[i, :, 0], back[i, :, 1] = best // len(degrees), best % len(degrees)

        def trace(i: int, e: int) -> list:
            splits = []
            while i > 0:
                j, k = int(back[i, e, 0]), int(degrees[back[i, e, 1]])
                splits.append((reqs[j:i], order[e - k : e]))
                i, e = j, e - k
            return splits

        # Prefill the i shortest now; each longer one waits until these batches end, then prefills alone on
        # all these instances (priced the same way, per input token). Requests at the skip bound must be in.
        must = max([k + 1 for k, r in enumerate(reqs) if r.skipped >= self.cfg.max_skips] + [1])
        alone = [self._prefill_time(e_n, [r]) / r.num_prefill_tokens for r in reqs]
        later = np.concatenate([np.cumsum(alone[::-1])[::-1], [0.0]])  # later[i]: sum over requests >= i
        best, best_cost = None, np.inf
        for i in range(must if self.cfg.defer_long else r_n, r_n + 1):
            e = int(np.argmin(f[i]))
            if not np.isfinite(f[i, e]):
                continue
            splits = trace(i, e)
            wait = max(self._prefill_time(len(inst), rs) for rs, inst in splits)
            total = f[i, e] + wait * (pw[r_n] - pw[i]) + later[i]
            if total < best_cost:
                best, best_cost = splits, total
        if best is None:  # the longest request is the one that does not fit: it waits, the others go
            longest = max(admitted, key=lambda r: (r.num_prefill_tokens, -r.priority, r.arrival))
            rest = [r for r in admitted if r is not longest]
            return self._batch(view, rest, free) if rest else []
        return self._place(view, best, free)

    def _place(self, view: SchedulerView, splits: list, free: list[int]) -> list[tuple[Group, list]]:
        """Concrete instances for each batch: its share of the sorted order, or aligned blocks of the free set."""
        out = []
        if not self.cfg.aligned_groups:
            for reqs, inst in splits:
                out.append((tuple(sorted(inst)), list(reqs)))
            return out
        left = set(free)
        for reqs, inst in sorted(splits, key=lambda s: -len(s[1])):
            k = len(inst)
            block = None
            while k >= 1 and block is None:
                blocks = [tuple(range(s, s + k)) for s in range(0, self.n, k) if left.issuperset(range(s, s + k))]
                if blocks:  # the one holding most of the batch's cached prefixes (it computes only the rest)
                    block = max(blocks, key=lambda b: (sum(view.cached_pages(r, b) for r in reqs), -b[0]))
                else:
                    k //= 2
            if block is None:
                continue
            reqs = list(reqs)
            page = view.pools[0].page_size
            room = sum(view.pools[i].free_pages for i in block)
            while reqs and (
                sum(_pages(r.num_prefill_tokens, page) + len(block) for r in reqs) > room
                or (len(reqs) > 1 and not fits_rank_cap(view, [r.num_prefill_tokens for r in reqs], len(block)))
            ):
                reqs.pop()
            if reqs:
                left -= set(block)
                out.append((block, reqs))
        return out

    # ----- step 4: scaling plan --------------------------------------------------------------------

    def _plans(self, view: SchedulerView, group: Group, reqs: Sequence[Request]) -> list[np.ndarray]:
        """Scale-down plans of a batch on its group, for the tokens after each request's prefix cached there
        (those are not computed again; the plan's entries for them are unused)."""
        page = view.pools[0].page_size
        where = [view.cached_on(r, group) for r in reqs]
        prefer = [[group.index(i) for i, _ in Counter(w).most_common()] for w in where]  # with its prefix
        lengths = [r.num_prefill_tokens - len(w) * page for r, w in zip(reqs, where)]
        plans = self._plan(lengths, [view.pools[i] for i in group], prefer)
        return [np.concatenate([np.zeros(len(w) * page, np.int32), p]) for w, p in zip(where, plans)]

    def _plan(self, lengths: list[int], pools: list, prefer: list[list[int]] | None = None) -> list[np.ndarray]:
        """Scale-down placement (`prefer`: ranks each request fills first). With a decode step target, each
        request keeps its KV on the fewest of the group's instances (busiest first) whose predicted decode
        step, with the KV they already hold, stays within the target; its tokens are split evenly between
        them."""
        target = self.cfg.decode_step_target
        if target is None:
            return PLANS[self.cfg.placement](lengths, pools, prefer=prefer)
        page = pools[0].page_size
        load = [p.used_tokens for p in pools]
        count = [len(p.tokens) for p in pools]
        free = [p.free_pages * page for p in pools]
        order = sorted(range(len(pools)), key=lambda r: (-load[r], r))
        plans = []
        for n in lengths:
            for k in range(1, len(pools) + 1):
                share = -(-n // k)
                keep = [r for r in order if free[r] >= share + page][:k]
                if len(keep) < k:
                    continue
                step = max(self.cost.decode_time(1, count[r] + 1, load[r] + share) for r in keep)
                if step <= target or k == len(pools):
                    break
            if len(keep) < k:  # cannot split evenly: fall back to filling in load order
                plans.append(busiest_first_plan([n], pools)[0])
                continue
            plan = np.repeat(np.asarray(sorted(keep), np.int32), share)[:n]
            for r in keep:
                got = int((plan == r).sum())
                load[r] += got
                free[r] -= -(-got // page) * page
                count[r] += 1
            plans.append(plan)
        return plans
