"""The elastic scheduler's decisions: dispatch, instance allocation (idle instances, pausing decodes),
batching, preemption and a large decision, on hand-built `SchedulerView`s and through the engine loop
driven by the simulated executor. Times come from the cost model fitted to the A800 cluster model."""

from __future__ import annotations

import numpy as np
import pytest

from loong_jax.engine import Engine, EngineConfig
from loong_jax.model.config import tiny_config
from loong_jax.model.sampling import SamplingParams
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.request import Request, Status
from loong_jax.runtime.work import Iteration
from loong_jax.scheduling.elastic import SLO, ElasticScheduler, SchedulerConfig
from loong_jax.scheduling.policy import SchedulerView
from loong_jax.simulation.cluster_model import A800, LLAMA2_7B, ClusterModel
from loong_jax.simulation.executor import SimExecutor

PAGE = 16
CLUSTER = ClusterModel(A800, LLAMA2_7B, 4, 2)
COST = CLUSTER.fitted_cost_model()


def pages(tokens: int) -> int:
    return -(-tokens // PAGE)


def make_request(rid: int, prompt: int, max_new: int, arrival: float | None = None, priority: int = 0) -> Request:
    params = SamplingParams(max_tokens=max_new, ignore_eos=True, temperature=0.0)
    req = Request(rid, [0] * prompt, params, max_new, seed=0, eos_ids=())
    req.arrival = float(rid if arrival is None else arrival)
    req.priority = priority
    return req


def make_decoding(
    rid: int, prompt: int, max_new: int, pools: list[PagePool], where: dict[int, int] | int, outputs: int = 1, **kw
) -> Request:
    """A running request past its prefill: `outputs` tokens sampled, its KV (prompt + outputs - 1 tokens) on
    the instances of `where` (instance -> tokens, or one instance holding all of it)."""
    req = make_request(rid, prompt, max_new, **kw)
    req.status = Status.RUNNING
    req.output_ids = [0] * outputs
    req.prefill_len = req.prefilled = prompt
    req.first_token_time = 0.0
    where = {where: req.num_tokens} if isinstance(where, int) else where
    assert sum(where.values()) == req.num_tokens
    for i, n in where.items():
        pools[i].append(rid, n)
    req.reserved_pages = pages(prompt + max_new) + len(pools)
    return req


def make_view(pools, waiting=(), decoding=(), reserved=None, max_num_seqs=4096, **kw) -> SchedulerView:
    if reserved is None:
        reserved = sum(r.reserved_pages for r in decoding)
    kw.setdefault("num_running", len(decoding))
    return SchedulerView(list(waiting), list(decoding), pools, max_num_seqs, 1 << 20, reserved, 16, **kw)


def elastic(n: int = 4, cost=COST, **cfg) -> ElasticScheduler:
    cfg.setdefault("aligned_groups", False)
    return ElasticScheduler(n, cost, SchedulerConfig(**cfg))


def admitted(it: Iteration) -> list[int]:
    return [r.rid for w in it.prefills for r in w.requests]


def check_valid(view: SchedulerView, it: Iteration, n: int) -> None:
    """Every program on distinct instances in range and not busy; plans and masters well-formed; every
    request in at most one program."""
    units = [w.group for w in it.prefills] + [w.group for w in it.decodes if w.requests]
    units += sorted({(m.src, m.dst) for m in it.migrations})
    flat = [i for u in units for i in u]
    assert len(flat) == len(set(flat)), f"an instance is in two programs: {units}"
    assert all(0 <= i < n for i in flat) and not view.busy.intersection(flat)
    waiting = {r.rid for r in view.waiting}
    decoding = {r.rid for r in view.decoding}
    rids = []
    for w in it.prefills:
        assert len(w.group) >= 1 and len(w.plans) == len(w.requests)
        for r, plan in zip(w.requests, w.plans):
            assert r.rid in waiting
            plan = np.asarray(plan)
            assert len(plan) == r.num_prefill_tokens and 0 <= plan.min() and plan.max() < len(w.group)
            rids.append(r.rid)
        held = np.zeros(len(w.group), np.int64)  # the plan fits the group's free pages
        for plan in w.plans:
            held += np.array([pages(int((np.asarray(plan) == k).sum())) for k in range(len(w.group))])
        assert all(held[k] <= view.pools[i].free_pages for k, i in enumerate(w.group))
    for w in it.decodes:
        assert len(w.masters) == len(w.requests)
        assert all(0 <= m < len(w.group) for m in w.masters)
        assert all(r.rid in decoding for r in w.requests)
        rids += [r.rid for r in w.requests]
    assert len(rids) == len(set(rids))


# ----- step 1: dispatch ---------------------------------------------------------------------------------


def test_dispatch_is_first_come_first_served():
    pools = [PagePool(4096, PAGE) for _ in range(4)]
    a, b, c = make_request(0, 100, 10, 0.0), make_request(1, 100, 10, 1.0), make_request(2, 100, 10, 2.0)
    it = elastic().schedule(make_view(pools, waiting=[c, a, b], max_num_seqs=2))  # queue order is not arrival
    assert sorted(admitted(it)) == [0, 1]
    it = elastic(max_batch_requests=1).schedule(make_view(pools, waiting=[c, b, a]))
    assert admitted(it) == [0]
    it = elastic().schedule(make_view(pools, waiting=[c, a, b]))
    assert sorted(admitted(it)) == [0, 1, 2]


def test_higher_priority_is_dispatched_first():
    pools = [PagePool(4096, PAGE) for _ in range(4)]
    a, b = make_request(0, 100, 10, 0.0), make_request(1, 100, 10, 1.0)
    urgent = make_request(2, 100, 10, 2.0, priority=5)
    it = elastic().schedule(make_view(pools, waiting=[a, b, urgent], max_num_seqs=1))
    assert admitted(it) == [2]
    it = elastic().schedule(make_view(pools, waiting=[a, b, urgent], max_num_seqs=2))
    assert sorted(admitted(it)) == [0, 2]
    low = make_request(3, 100, 10, -1.0, priority=-1)  # earliest, but lowest priority
    it = elastic().schedule(make_view(pools, waiting=[low, a], max_num_seqs=1))
    assert admitted(it) == [0]


def test_bounded_skipping():
    """A request that does not fit now lets later ones pass, but only max_skips times; then it blocks."""
    pools = [PagePool(64, PAGE) for _ in range(4)]  # 256 pages in all
    big = make_request(0, 100, 900, 0.0)  # reserves 63 + 4 pages: no room while 200 are reserved
    sched = elastic(max_skips=3)
    for k in range(3):
        small = make_request(1 + k, 20, 10, 1.0 + k)  # reserves 2 + 4 pages
        it = sched.schedule(make_view(pools, waiting=[big, small], reserved=200, num_running=3))
        assert admitted(it) == [small.rid]
        assert big.skipped == k + 1
    late = make_request(9, 20, 10, 9.0)
    it = sched.schedule(make_view(pools, waiting=[big, late], reserved=200, num_running=3))
    assert admitted(it) == [] and big.skipped == 3  # the queue is blocked behind big
    it = sched.schedule(make_view(pools, waiting=[big, late], reserved=180, num_running=3))
    assert sorted(admitted(it)) == [0, 9]  # memory freed: big goes, and the queue moves again


def test_skipping_is_not_counted_for_earlier_or_higher_priority_requests():
    pools = [PagePool(64, PAGE) for _ in range(4)]
    big = make_request(0, 100, 900, 5.0)  # arrived after the small one: nobody jumps ahead of it
    small = make_request(1, 20, 10, 1.0)
    it = elastic().schedule(make_view(pools, waiting=[big, small], reserved=200, num_running=3))
    assert admitted(it) == [1] and big.skipped == 0


def test_bounded_skipping_with_equal_arrival_times():
    pools = [PagePool(64, PAGE) for _ in range(4)]
    big = make_request(0, 100, 900, 0.0)
    sched = elastic(max_skips=3)
    passed = 0
    for k in range(6):
        small = make_request(1 + k, 20, 10, 0.0)  # same timestamp, behind big in the queue (higher rid)
        it = sched.schedule(make_view(pools, waiting=[big, small], reserved=200, num_running=3))
        passed += admitted(it) == [small.rid]
    assert passed == 3 and big.skipped == 3


@pytest.mark.parametrize("reserved,ok", [(246, True), (247, False)])
def test_admission_reserves_prompt_and_all_new_tokens(reserved, ok):
    pools = [PagePool(64, PAGE) for _ in range(4)]  # 256 pages
    req = make_request(0, 64, 32)  # 6 pages of tokens + a partial page per instance = 10 pages
    view = make_view(pools, waiting=[req], reserved=reserved, num_running=1)
    assert view.pages_to_reserve(req) == 10
    assert admitted(elastic().schedule(view)) == ([0] if ok else [])


def test_a_request_larger_than_the_pool_with_growth_is_never_admitted():
    pools = [PagePool(64, PAGE) for _ in range(4)]
    huge = make_request(0, 100, 5000, 0.0)  # the prompt alone fits on one instance, its growth does not
    small = make_request(1, 10, 10, 1.0)
    it = elastic().schedule(make_view(pools, waiting=[huge, small], reserved=0))
    assert admitted(it) == [1]
    assert all(r.rid != 0 for w in it.prefills for r in w.requests)


def test_prompt_larger_than_the_free_pages_waits():
    pools = [PagePool(64, PAGE) for _ in range(2)]
    for i in range(2):
        pools[i].append(100 + i, 60 * PAGE)  # only 4 free pages per instance (held by busy programs)
    req = make_request(0, 200, 1)  # 13 pages of prompt: fits the reservation, not the free pages
    it = elastic(2).schedule(make_view(pools, waiting=[req], reserved=0, num_running=2))
    assert admitted(it) == []


# ----- steps 2 and 3: allocation and batching --------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
def test_one_long_request_on_an_idle_cluster_uses_every_instance(aligned):
    pools = [PagePool(4096, PAGE) for _ in range(4)]  # 65536 tokens each
    req = make_request(0, 60_000, 100)
    view = make_view(pools, waiting=[req])
    it = elastic(aligned_groups=aligned).schedule(view)
    check_valid(view, it, 4)
    assert len(it.prefills) == 1 and not it.decodes
    work = it.prefills[0]
    assert work.group == (0, 1, 2, 3) and admitted(it) == [0]
    assert len(np.unique(work.plans[0])) == 1  # busiest-first scale-down: one instance can keep it all


def test_short_requests_do_not_all_go_to_one_big_group():
    """Many short prompts on idle instances: the batching DP does not put a 16-token prompt on 4 ranks."""
    pools = [PagePool(4096, PAGE) for _ in range(4)]
    reqs = [make_request(i, 16, 8) for i in range(4)]
    view = make_view(pools, waiting=reqs)
    it = elastic().schedule(view)
    check_valid(view, it, 4)
    assert sorted(admitted(it)) == [0, 1, 2, 3]
    assert max(len(w.group) for w in it.prefills) < 4


@pytest.mark.parametrize("aligned", [False, True])
def test_requests_prefill_where_their_cached_prefix_lies(aligned):
    """Prompts whose long prefixes are cached on instance 3, on 2, on 1, and on 0 and 1 each prefill on a
    group holding their prefix (they compute only their new tokens there), before a long prompt with
    nothing cached gets instances."""
    pools = [PagePool(4096, PAGE) for _ in range(4)]
    homes = {0: [3] * 400, 1: [2] * 400, 2: [1] * 400, 3: [0] * 200 + [1] * 200, 4: []}
    reqs = [make_request(i, 8_000, 16) for i in range(4)] + [make_request(4, 30_000, 16)]

    def cached(req, instances):  # the longest run of its cached pages on these instances
        where = homes[req.rid]
        k = next((k for k, i in enumerate(where) if i not in instances), len(where))
        return where[:k]

    view = make_view(pools, waiting=reqs, cached=cached)
    it = elastic(aligned_groups=aligned).schedule(view)
    check_valid(view, it, 4)
    group_of = {r.rid: w.group for w in it.prefills for r in w.requests}
    assert sorted(group_of)[:4] == [0, 1, 2, 3]
    for rid in range(4):
        assert set(homes[rid]) <= set(group_of[rid]), group_of


@pytest.mark.parametrize("aligned", [False, True])
def test_idle_instances_prefill_while_decode_groups_keep_decoding(aligned):
    pools = [PagePool(4096, PAGE) for _ in range(4)]
    dec = [make_decoding(1 + k, 500, 16, pools, k % 2, outputs=3) for k in range(16)]  # 8 on 0, 8 on 1
    long = make_request(0, 30_000, 16, arrival=100.0)
    view = make_view(pools, waiting=[long], decoding=dec)
    it = elastic(aligned_groups=aligned).schedule(view)
    check_valid(view, it, 4)
    assert [w.group for w in it.prefills] == [(2, 3)] and admitted(it) == [0]
    assert sorted(w.group for w in it.decodes) == [(0,), (1,)]
    assert sorted(r.rid for w in it.decodes for r in w.requests) == [r.rid for r in dec]
    for w in it.decodes:  # masters hold the request's KV (no scale-up needed)
        assert all(pools[w.group[m]].tokens.get(r.rid) for r, m in zip(w.requests, w.masters))


def test_busy_instances_are_left_alone():
    pools = [PagePool(4096, PAGE) for _ in range(4)]
    make_decoding(1, 500, 16, pools, 1)  # its KV is on busy instance 1: the engine does not offer it
    long = make_request(0, 30_000, 16, arrival=100.0)
    view = make_view(pools, waiting=[long], busy=frozenset({0, 1}), num_running=1)
    it = elastic().schedule(view)
    check_valid(view, it, 4)
    assert [w.group for w in it.prefills] == [(2, 3)] and not it.decodes


def _pause_view(per_instance: int, prompt: int, max_new: int, outputs: int, waiting_prompt: int, idle: int = 0):
    pools = [PagePool(65536, PAGE) for _ in range(4)]
    dec, rid = [], 1
    for i in range(4 - idle):
        for _ in range(per_instance):
            dec.append(make_decoding(rid, prompt, max_new, pools, i, outputs=outputs))
            rid += 1
    new = make_request(0, waiting_prompt, 16, arrival=1000.0)
    return make_view(pools, waiting=[new], decoding=dec), dec


def test_pauses_a_small_long_running_decode_group_for_a_long_prompt():
    """No idle instance; one request per instance with a million tokens still to generate. Waiting for a
    group to drain costs the new request hours; pausing costs the decodes a few seconds out of their hours."""
    view, dec = _pause_view(per_instance=1, prompt=1000, max_new=1_000_000, outputs=2, waiting_prompt=50_000)
    drain = (1_000_000 - 2) * COST.decode_time(1, 1, 1001)
    with_4 = COST.prefill_time(4, [50_000])
    assert (drain / 50_000) > 1000 * (4 * with_4 / 1_000_000)  # the cost model clearly says: pause
    it = elastic().schedule(view)
    check_valid(view, it, 4)
    assert admitted(it) == [0]
    paused = {i for w in it.prefills for i in w.group}
    assert len(paused) >= 2  # the prefill runs on the paused groups' instances, in parallel
    decoding = {i for w in it.decodes for i in w.group}
    assert not paused & decoding and paused | decoding == {0, 1, 2, 3}
    held = {r.rid: next(i for i in range(4) if view.pools[i].tokens.get(r.rid)) for r in dec}
    assert {r.rid for w in it.decodes for r in w.requests} == {rid for rid, i in held.items() if i not in paused}


def test_does_not_pause_many_nearly_done_decodes_for_a_tiny_prompt():
    """Every instance decodes 64 requests two steps from done; a 16-token prompt is better off waiting."""
    view, dec = _pause_view(per_instance=64, prompt=100, max_new=4, outputs=2, waiting_prompt=16)
    drain = 2 * COST.decode_time(1, 64, 64 * 101)
    with_1 = COST.prefill_time(1, [16])
    assert with_1 * 64 / 4 > 10 * (drain / 16)  # the cost model clearly says: do not pause
    it = elastic().schedule(view)
    check_valid(view, it, 4)
    assert not it.prefills and not it.preempt
    assert sorted(w.group for w in it.decodes) == [(0,), (1,), (2,), (3,)]
    assert sum(len(w.requests) for w in it.decodes) == 256
    # control: the same request is admissible, as soon as an instance is idle
    view, _ = _pause_view(per_instance=64, prompt=100, max_new=4, outputs=2, waiting_prompt=16, idle=1)
    it = elastic().schedule(view)
    assert admitted(it) == [0] and [w.group for w in it.prefills] == [(3,)]


def test_pause_can_be_disabled():
    view, _ = _pause_view(per_instance=1, prompt=1000, max_new=1_000_000, outputs=2, waiting_prompt=50_000)
    it = elastic(pause_decodes=False).schedule(view)
    assert not it.prefills and len(it.decodes) == 4


def _slo_view(waited: float, decoding_for: float, busy: tuple[int, ...] = ()):
    """Four single-instance decode groups (8 requests each, 390 tokens still to generate, decoding for
    `decoding_for` seconds) and a 30K-token prompt that has waited `waited` seconds; `busy` instances are
    in the middle of their decode step."""
    pools = [PagePool(65536, PAGE) for _ in range(4)]
    now = 100.0
    dec = [make_decoding(1 + 8 * i + k, 4000, 400, pools, i, outputs=10) for i in range(4) for k in range(8)]
    for r in dec:
        r.first_token_time = now - decoding_for
    new = make_request(0, 30_000, 16, arrival=now - waited)
    stepping = [((i,), [r for r in dec if r.rid in pools[i].tokens]) for i in busy]
    free = [r for r in dec if all(r not in reqs for _, reqs in stepping)]
    view = make_view(pools, waiting=[new], decoding=free, now=now, busy=frozenset(busy), stepping=stepping)
    view.num_running = len(dec)
    return view


SLO_TARGETS = SLO(ttft_scale=25, ttft_floor=15.0, tpot=0.050)


def test_slo_pauses_decodes_that_keep_their_tpot_for_a_prompt_the_normalised_test_leaves_waiting():
    view = _slo_view(waited=5.0, decoding_for=0.1)
    it = elastic().schedule(view)  # input-normalised: 1/30000 per second saved is worth little
    assert not it.prefills and len(it.decodes) == 4
    it = elastic(slo=SLO_TARGETS).schedule(view)
    check_valid(view, it, 4)
    assert admitted(it) == [0]
    paused = {i for w in it.prefills for i in w.group}
    assert paused and not paused & {i for w in it.decodes for i in w.group}


@pytest.mark.parametrize(
    "waited,decoding_for,why",
    [(5.0, 18.0, "the paused decodes would miss their TPOT"), (30.0, 0.1, "the prompt cannot meet its TTFT anyway")],
)
def test_slo_does_not_pause_when_it_cannot_help(waited, decoding_for, why):
    view = _slo_view(waited=waited, decoding_for=decoding_for)
    it = elastic(slo=SLO_TARGETS).schedule(view)
    check_valid(view, it, 4)
    assert not it.prefills and len(it.decodes) == 4, why


def test_slo_pause_is_for_the_shortest_prompts_it_can_serve_in_time():
    """A long prompt would keep the decodes paused past their TPOT; the short ones get the paused instances."""
    view = _slo_view(waited=5.0, decoding_for=5.0)
    view.waiting = [make_request(0, 150_000, 16, arrival=95.0), make_request(50, 2_000, 16, arrival=95.0)]
    it = elastic(slo=SLO_TARGETS).schedule(view)
    check_valid(view, it, 4)
    assert admitted(it) == [50]


def test_a_prefill_waits_for_decode_steps_in_flight_to_pause_those_groups_too():
    view = _slo_view(waited=5.0, decoding_for=0.1, busy=(1, 2, 3))
    it = elastic(slo=SLO_TARGETS).schedule(view)
    assert [w.group for w in it.prefills] == [(0,)]  # without waiting: the one free group is paused
    it = elastic(slo=SLO_TARGETS, wait_for_steps=True).schedule(view)
    check_valid(view, it, 4)
    assert not it.prefills and not it.decodes  # instance 0 is held until the others finish their step


def _stepping_view(in_flight: int):
    """Instance 0 free with 64 decoding requests, instances 1-3 in the middle of a decode step with
    `in_flight` requests each (all 990 tokens from done); a 500-token prompt waits. No instance drains for
    seconds, so pausing instance 0 beats waiting for a drain."""
    pools = [PagePool(65536, PAGE) for _ in range(4)]
    dec, rid = [], 1
    for i in range(4):
        for _ in range(64 if i == 0 else in_flight):
            dec.append(make_decoding(rid, 300, 1000, pools, i, outputs=10))
            rid += 1
    stepping = [((i,), [r for r in dec if r.rid in pools[i].tokens]) for i in (1, 2, 3)]
    free = [r for r in dec if r.rid in pools[0].tokens]
    view = make_view(pools, waiting=[make_request(0, 500, 16)], decoding=free, busy=frozenset({1, 2, 3}))
    view.stepping, view.num_running = stepping, len(dec)
    return view


@pytest.mark.parametrize("pause_later", [False, True])
def test_pauses_the_free_group_when_the_groups_in_flight_cost_as_much(pause_later):
    """Declining would only move the pause to the next group whose step ends (the prompt waiting for it)."""
    view = _stepping_view(in_flight=64)
    it = elastic(pause_later=pause_later).schedule(view)
    check_valid(view, it, 4)
    assert admitted(it) == [0] and [w.group for w in it.prefills] == [(0,)] and not it.decodes


def test_pause_later_leaves_the_pause_to_a_much_cheaper_group_in_flight():
    """Pausing one request in flight at the end of its step costs far less than pausing 64 now."""
    view = _stepping_view(in_flight=1)
    assert admitted(elastic().schedule(view)) == [0]  # priced against waiting for a drain: pause now
    it = elastic(pause_later=True).schedule(view)
    check_valid(view, it, 4)
    assert not it.prefills and [w.group for w in it.decodes] == [(0,)]


# ----- step 4: preemption ---------------------------------------------------------------------------------


def test_preempts_the_newest_lowest_priority_request_when_every_pool_is_full():
    pools = [PagePool(4, PAGE) for _ in range(2)]  # 2 x 4 pages, filled exactly below
    a = make_decoding(0, 80, 50, pools, {0: 32, 1: 48}, outputs=1, arrival=0.0)  # spans both: one group
    b = make_decoding(1, 32, 50, pools, 0, outputs=1, arrival=1.0, priority=1)  # newest, but more important
    c = make_decoding(2, 16, 50, pools, 1, outputs=1, arrival=0.5)
    assert all(p.free_pages == 0 for p in pools)
    assert all(p.pages_needed(r.rid, 1) == 1 for p in pools for r in (a, b, c) if p.tokens.get(r.rid))
    view = make_view(pools, decoding=[a, b, c])
    it = elastic(2).schedule(view)
    check_valid(view, it, 2)
    assert [r.rid for r in it.preempt] == [2]
    assert all(r.rid != 2 for w in it.decodes for r in w.requests)


def test_preemption_victim_is_the_newest_even_if_others_have_room():
    pools = [PagePool(4, PAGE)]
    old = make_decoding(0, 24, 50, pools, 0, outputs=1, arrival=0.0)  # 24 tokens: room left in its 2nd page
    new = make_decoding(1, 32, 50, pools, 0, outputs=1, arrival=1.0)  # 32 tokens: needs a 5th page
    assert pools[0].free_pages == 0
    assert pools[0].pages_needed(old.rid, 1) == 0 and pools[0].pages_needed(new.rid, 1) == 1
    it = elastic(1).schedule(make_view(pools, decoding=[old, new]))
    assert [r.rid for r in it.preempt] == [1]


def test_no_preemption_while_any_page_is_free():
    pools = [PagePool(4, PAGE) for _ in range(2)]
    a = make_decoding(0, 64, 50, pools, 0)  # instance 0 full; instance 1 has room to scale up onto
    view = make_view(pools, decoding=[a])
    it = elastic(2).schedule(view)
    check_valid(view, it, 2)
    assert not it.preempt
    assert [w.group for w in it.decodes] == [(0, 1)] and it.decodes[0].masters == [1]


def _two_full_instances_two_free():
    pools = [PagePool(4, PAGE) for _ in range(4)]
    x = make_decoding(0, 64, 50, pools, 0)  # fills instance 0
    y = make_decoding(1, 64, 50, pools, 1)  # fills instance 1; instances 2 and 3 are empty
    return make_view(pools, decoding=[x, y])


def test_full_decode_instances_scale_up_onto_free_ones():
    view = _two_full_instances_two_free()
    it = elastic(4).schedule(view)
    check_valid(view, it, 4)
    assert not it.preempt and sorted(r.rid for w in it.decodes for r in w.requests) == [0, 1]
    for w in it.decodes:  # each master is a new instance with room (scale-up)
        assert all(view.pools[w.group[m]].free_pages > 0 for m in w.masters)


def test_aligned_full_decode_instances_still_make_progress():
    view = _two_full_instances_two_free()
    it = elastic(4, aligned_groups=True).schedule(view)
    check_valid(view, it, 4)
    assert it.decodes or it.preempt, "nothing can run: the engine would stall"


# ----- a large decision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
def test_one_decision_with_a_thousand_waiting_requests_on_64_instances(aligned):
    n = 64
    cost = ClusterModel(A800, LLAMA2_7B, n, 2).fitted_cost_model()
    rng = np.random.default_rng(0)
    pools = [PagePool(8192, PAGE) for _ in range(n)]
    dec = []
    for k in range(96):  # decoding requests on the first 32 instances, some spanning two
        i = k % 32
        where = {i: 300, i + 1: 200} if k % 5 == 0 else i
        dec.append(make_decoding(10_000 + k, 500, 64, pools, where, outputs=1))
    waiting = [make_request(k, int(rng.integers(10, 60_000)), int(rng.integers(16, 512))) for k in range(1000)]
    busy = frozenset({40, 41, 63})
    view = make_view(pools, waiting=waiting, decoding=dec, busy=busy)
    it = elastic(n, cost, aligned_groups=aligned).schedule(view)
    check_valid(view, it, n)
    assert 1 <= len(admitted(it)) <= view.max_num_seqs - view.num_running
    prefilling = {i for w in it.prefills for i in w.group}
    decoded = {r.rid for w in it.decodes for r in w.requests}
    for r in dec:  # every decoding request decodes, or its group was paused for the prefill
        on = {i for i in range(n) if pools[i].tokens.get(r.rid)}
        assert (r.rid in decoded) != bool(on & prefilling)
    if aligned:
        for w in [*it.prefills, *it.decodes]:
            k = len(w.group)
            assert k & (k - 1) == 0 and w.group[0] % k == 0 and list(w.group) == list(range(w.group[0], w.group[0] + k))


# ----- through the engine loop with the simulated executor -----------------------------------------------


def sim_engine(num_instances=1, kv_tokens=1024, max_num_seqs=256, **cfg) -> Engine:
    ecfg = EngineConfig(
        max_model_len=1 << 16,
        num_instances=num_instances,
        kv_tokens_per_instance=kv_tokens,
        page_size=PAGE,
        max_num_seqs=max_num_seqs,
        max_prefill_tokens=1 << 16,
        aligned_groups=False,
    )
    timing = ClusterModel(A800, LLAMA2_7B, num_instances, 2)
    policy = elastic(num_instances, timing.fitted_cost_model(), **cfg)
    return Engine(tiny_config(), ecfg, SimExecutor(timing), seed=0, policy=policy)


def add(engine: Engine, prompt: int, max_new: int, priority: int = 0) -> Request:
    params = SamplingParams(max_tokens=max_new, ignore_eos=True, temperature=0.0)
    return engine.add_request([1] * prompt, params, priority=priority)


def drain(engine: Engine, max_steps: int = 100_000) -> None:
    total = sum(p.num_pages for p in engine.pools)
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
        assert sum(r.reserved_pages for r in engine.running) <= total  # memory-safe admission
        busy = [i for x in engine.launches for i in x.group]
        assert len(busy) == len(set(busy))  # launches in flight on disjoint instances
    raise AssertionError("the engine did not finish")


def test_engine_serves_higher_priority_first():
    engine = sim_engine(max_num_seqs=1)
    reqs = [add(engine, 100, 4) for _ in range(3)]
    urgent = add(engine, 100, 4, priority=1)
    drain(engine)
    order = sorted([*reqs, urgent], key=lambda r: r.first_token_time)
    assert order == [urgent, *reqs]
    assert all(r.finish_reason == "length" and len(r.output_ids) == 4 for r in [*reqs, urgent])


@pytest.mark.parametrize("max_skips,bounded", [(2, True), (1000, False)])
def test_engine_bounds_how_often_a_big_request_is_passed(max_skips, bounded):
    engine = sim_engine(kv_tokens=1024, max_skips=max_skips)  # 64 pages
    first = add(engine, 400, 300)  # reserves 45 pages for a while
    engine.step()
    engine.step()  # its prefill is done: the clock has moved
    big = add(engine, 300, 200)  # needs 33: waits for the first to finish
    smalls = []
    for _ in range(8):  # small requests keep coming, each fits at once
        for _ in range(3):
            engine.step()
        smalls.append(add(engine, 10, 5))
    drain(engine)
    assert all(r.finish_reason == "length" for r in [first, big, *smalls])
    before_big = [s for s in smalls if s.scheduled_time < big.scheduled_time]
    assert all(s.arrival > big.arrival for s in smalls)
    if bounded:
        assert big.skipped == max_skips
        assert len(before_big) == max_skips  # then the queue blocked behind big
    else:
        assert big.skipped > 2
        assert len(before_big) == len(smalls)  # every small one passed


def test_engine_under_memory_pressure_never_preempts():
    engine = sim_engine(num_instances=4, kv_tokens=512)  # 32 pages per instance
    rng = np.random.default_rng(1)
    reqs = [add(engine, int(rng.integers(1, 300)), int(rng.integers(1, 100))) for _ in range(60)]
    drain(engine)
    assert engine.stats.preemptions == 0
    assert all(r.finish_reason == "length" and len(r.output_ids) == r.max_new_tokens for r in reqs)
    assert engine.kv_used_tokens == 0 and all(p.free_pages == p.num_pages for p in engine.pools)


def test_engine_view_lists_the_decode_steps_in_flight():
    engine = sim_engine(num_instances=4)
    reqs = [add(engine, 100, 50) for _ in range(2)]
    for _ in range(100):
        engine.step()
        if any(x.kind == "decode" for x in engine.launches):
            break
    view = engine._view()
    steps = [x for x in engine.launches if x.kind == "decode"]
    assert steps and [(g, list(r)) for g, r in view.stepping] == [(x.group, x.requests) for x in steps]
    assert all(set(g) <= view.busy for g, _ in view.stepping) and {r.rid for r in reqs} >= {
        r.rid for _, rs in view.stepping for r in rs
    }
