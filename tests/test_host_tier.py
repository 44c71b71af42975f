"""The host-memory tier of the prefix cache: pages the pools evict are kept in host memory and loaded back on
a hit, onto whichever instances the prefill runs on. Outputs equal those without any cache (tokens and
log-probabilities); the bookkeeping of both tiers stays consistent under random workloads; a load that fails
or a request aborted during one loses nothing else; the tier never holds more than its size."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from esp_helpers import evict_all, greedy_params, pool_tokens, reference_kv, run_to_end, tiny_esp_engine

from loong_jax import SamplingParams
from loong_jax.prefix import HostTier
from loong_jax.runtime.host_store import PageStore
from loong_jax.runtime.kv_pool import KVCache, PagePool
from loong_jax.runtime.memory import process_rss_bytes
from loong_jax.runtime.programs import gather_pages_program, scatter_pages_program
from loong_jax.runtime.work import Iteration, PrefillWork

PAGE = 4
STEPS = 6


def _engine(num_instances: int, kv_tokens: int = 64, tier_gib: float | None = None, **limits):
    limits = {"max_model_len": 60, "max_prefill_tokens": 60, "host_kv_cache_gib": tier_gib, **limits}
    return tiny_esp_engine(num_instances=num_instances, kv_tokens=kv_tokens, page_size=PAGE, limits=limits)


def _same(got, want):
    assert got.output_ids == want.output_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_the_tier_is_a_bounded_lru_that_never_reuses_a_slot_being_loaded():
    tier = HostTier(3, 64)
    keys = [bytes([k]) for k in range(6)]
    assert tier.put(keys[:3]) == [0, 1, 2] and tier.put(keys[:1]) == [None]  # held: only marked used
    assert tier.run(keys, 0) == 3 and tier.run(keys, 1) == 2
    assert tier.pin(keys[1:2]) == [1]  # being loaded: its slot is not reused, though least recently used
    assert tier.put(keys[3:5]) == [2, 0]  # evicts key 2, then key 0 (key 1 is pinned)
    assert keys[1] in tier and keys[0] not in tier and keys[2] not in tier and tier.stats.evictions == 2
    tier.release([1])
    assert tier.put(keys[5:]) == [1]
    assert tier.pages == 3 and tier.stats.stored_pages == 6 and tier.stats.stored_bytes == 6 * 64
    tier.discard(keys[3:4])  # a failed load forgets its pages
    assert tier.pages == 2 and tier.put(keys[:1]) == [2]
    tier.check()
    with pytest.raises(ValueError, match=">= 1 page"):
        HostTier(0)


def _read(store, slots):
    """K and V of these slots, in their order, put together from the store's views."""
    k, v = np.empty((2, len(slots), *store.k.shape[1:]), store.k.dtype)
    for at, pk, pv in store.views(slots, 8):
        k[at], v[at] = pk[: len(at)], pv[: len(at)]
    return k, v


def test_the_store_files_copies_in_order_and_loads_read_it_in_place():
    store = PageStore(20, (2, 1, PAGE, 2), np.float32)
    pages = np.arange(5 * 2 * PAGE * 2, dtype=np.float32).reshape(5, 2, 1, PAGE, 2)
    store.write([0, 1], pages[:2], -pages[:2])
    store.stage([2, 0], jnp.asarray(pages[2:5]), jnp.asarray(-pages[2:5]))  # device arrays (one padding row)
    store.stage([0], jnp.asarray(pages[4:5]), jnp.asarray(-pages[4:5]))  # slot 0 again: the later copy wins
    views = store.views([0, 2, 1], 8)  # waits for the copies on their way to these slots
    assert [at for at, _, _ in views] == [[0, 2], [1]]  # slots 0-1 and 2: pieces of power-of-two length
    assert all(np.shares_memory(k, store.k) and np.shares_memory(v, store.v) for _, k, v in views)  # no copy
    assert [at for at, _, _ in store.views(list(range(5)), 2)] == [[0, 1], [2, 3], [4]]  # at most 2 a piece
    k, v = _read(store, [0, 2, 1])
    np.testing.assert_array_equal(k, pages[[4, 2, 1]])
    np.testing.assert_array_equal(v, -pages[[4, 2, 1]])
    scattered = list(range(18, -1, -2))  # ten pieces: copied, in pieces of 8 and 2
    store.write(scattered, np.repeat(pages[:1], 10, 0), pages[[j % 5 for j in range(10)]])
    views = store.views(scattered, 8)
    assert [at for at, _, _ in views] == [list(range(9, 1, -1)), [1, 0]]  # in the order of their slots
    assert not any(np.shares_memory(k, store.k) for _, k, _ in views)
    np.testing.assert_array_equal(_read(store, scattered)[1], pages[[j % 5 for j in range(10)]])
    store.lose([1])
    with pytest.raises(RuntimeError, match=r"slots \[1\] hold no K/V"):
        store.views([1], 8)
    store.write([1], pages[:1], pages[:1])  # rewritten: readable again
    np.testing.assert_array_equal(_read(store, [1])[1][0], pages[0])


def test_pools_report_the_cached_pages_they_evict_only_when_asked():
    pool = PagePool(2, PAGE)
    pool.append(0, 2 * PAGE, 0)
    pool.publish(0, 0, b"a")
    pool.publish(0, 1, b"b")
    pool.release(0)
    pool.append(1, PAGE, None)
    assert pool.evicted is None and pool.evictions == 1
    pool.evicted = []
    pool.append(1, PAGE, None)
    assert pool.evicted == [(0, b"a")]  # released last page first: the first page is evicted last
    pool.check()


def test_the_tier_memory_stays_within_its_size_under_ten_times_its_size():
    """Pages of 1 MiB stored through a 64 MiB tier, 640 MiB in all: resident memory grows by the tier's
    size at most (its arrays are filled in place, least recently used pages overwritten)."""
    before = process_rss_bytes()
    tier, store = HostTier(32, 1 << 20), PageStore(32, (1, 1, 1024, 128), np.float32)  # 2 x 512 KiB a page
    page = np.ones((1, 1, 1, 1024, 128), np.float32)
    for n in range(320):
        (slot,) = tier.put([n.to_bytes(4, "little")])
        store.write([slot], page * n, page)
    grown = process_rss_bytes() - before
    assert tier.pages == 32 and tier.stats.evictions == 320 - 32
    assert grown < store.capacity * store.page_bytes + (24 << 20), f"resident memory grew {grown >> 20} MiB"


@pytest.mark.parametrize("num_instances", [1, 4, 8])
def test_outputs_with_every_reuse_from_host_memory_equal_no_cache(num_instances):
    """Conversations whose earlier turns are evicted from the pools before the next turn: each later turn
    loads its history from host memory, and every output equals the output without any cache."""
    rng = np.random.default_rng(num_instances)
    history = [rng.integers(3, 256, 21).tolist() for _ in range(2)]
    turns = [h + rng.integers(3, 256, 5).tolist() for h in history] + [h + [7, 8, 9] for h in history]

    def run(engine):
        out, fill = [], np.random.default_rng(0)
        for prompt in turns:
            out.append(run_to_end(engine, prompt, STEPS))
            evict_all(engine, fill)
        return out

    plain = _engine(num_instances, tier_gib=0)
    plain.prefix_cache.enabled = False
    want = run(plain)
    engine = _engine(num_instances)
    tier = engine.prefix_cache.tier
    if num_instances == 1:
        assert engine.executor.warmup_pages() == 14  # gather and scatter of 1, 2, 4, ... 64 pages
    got = run(engine)
    if num_instances == 1:
        assert len(engine.executor._page_programs) == 14  # nothing more compiled while serving
    for g, w in zip(got, want):
        _same(g, w)
    assert [r.cached_tokens for r in got] == [0, 0, 20, 20]  # whole pages of the history, from host memory
    assert tier.stats.hits == 2 and tier.stats.hit_tokens == 40 == engine.prefix_cache.stats.hit_tokens
    assert tier.stats.loaded_bytes == 10 * tier.page_bytes


def test_a_prefix_loads_onto_another_group_where_its_plan_puts_it():
    """Computed on instance 0, evicted, then prefilled on instances 2 and 3 with a plan putting its first 12
    tokens on 3 and the rest on 2: the loaded pages land there and hold the K/V of the tokens."""
    engine = _engine(4)
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 256, 30).tolist()
    first = run_to_end(engine, prompt[:25], 1, (0,), np.zeros(25))
    evict_all(engine, rng)
    req = engine.add_request(prompt, greedy_params(3, logprobs=0))
    plan = np.where(np.arange(30) < 12, 1, 0)
    engine.execute(Iteration(prefills=[PrefillWork((2, 3), [req], [plan.astype(np.int32)])]))
    assert req.cached_tokens == 24 and first.cached_tokens == 0
    assert engine.pools[3].tokens[req.rid] == 12 and engine.pools[2].tokens[req.rid] == 18
    np.testing.assert_array_equal(engine.pools[3].positions(req.rid), np.arange(12))
    want_k, want_v = reference_kv(engine, prompt)
    for i, at in ((3, slice(0, 12)), (2, slice(12, 30))):
        k, v = pool_tokens(engine, i, req.rid)
        np.testing.assert_allclose(k, want_k[:, at], atol=1e-5)
        np.testing.assert_allclose(v, want_v[:, at], atol=1e-5)
    while not req.finished:
        engine.step()


def test_random_workloads_evict_from_both_tiers_and_stay_consistent():
    """Prompts sharing a few prefixes on small pools and a host tier of 12 pages: pages are evicted from the
    pools and from the tier (more than ten times its size goes through it); after every step both are
    consistent, and every output is the uncached one."""
    rng = np.random.default_rng(3)
    prefixes = [rng.integers(3, 256, n).tolist() for n in (17, 26, 35, 41)]
    prompts = [prefixes[rng.integers(4)] + rng.integers(3, 256, rng.integers(1, 12)).tolist() for _ in range(36)]
    tokens = rng.integers(1, 8, len(prompts))
    waves = np.split(np.arange(len(prompts)), [5, 11, 17, 26])

    def run(engine):
        out = {}
        for wave in waves:
            reqs = {int(k): engine.add_request(prompts[k], greedy_params(int(tokens[k]), logprobs=0)) for k in wave}
            while engine.has_unfinished():
                engine.step()
                for pool in engine.pools:
                    pool.check()
                if engine.prefix_cache.tier is not None:
                    engine.prefix_cache.tier.check()
            out.update(reqs)
        assert engine.kv_used_tokens == 0
        return [out[k] for k in range(len(prompts))]

    plain = _engine(4, kv_tokens=48, tier_gib=0)
    plain.prefix_cache.enabled = False
    want = run(plain)
    engine = _engine(4, kv_tokens=48, tier_gib=12 * 2 * 2 * 2 * PAGE * 16 * 4 / 2**30)
    tier = engine.prefix_cache.tier
    assert tier.capacity == 12
    got = run(engine)
    for g, w in zip(got, want):
        _same(g, w)
    assert tier.stats.hits > 0 and tier.stats.evictions > 0 and engine.prefix_cache.evictions > 0
    assert tier.stats.stored_pages >= 10 * tier.capacity and tier.pages <= tier.capacity  # ten times its size


def test_a_failed_load_only_costs_the_reuse_and_an_abort_during_a_load_frees_everything(monkeypatch):
    engine = _engine(2)
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 256, 29).tolist()
    want = run_to_end(engine, prompt, STEPS)
    evict_all(engine, rng)
    tier = engine.prefix_cache.tier

    def broken(*args):
        raise RuntimeError("transfer refused")

    with monkeypatch.context() as m:
        m.setattr(engine.executor, "load_pages", broken)
        again = run_to_end(engine, prompt, STEPS)
    _same(again, want)
    assert again.cached_tokens == 0 and tier.stats.hits == 0 and not engine.prefix_cache.failed_loads
    assert tier.stats.failed_loads == 1
    evict_all(engine, rng)
    req = engine.add_request(prompt, greedy_params(STEPS, logprobs=0))
    engine.step()  # its load and prefill are dispatched
    assert tier.stats.hits == 1 and req.cached_tokens == 28
    engine.abort(req.rid)
    while engine.has_unfinished() or engine.launches:
        engine.step()
    assert engine.kv_used_tokens == 0
    for pool in engine.pools:
        pool.check()
    tier.check()
    _same(run_to_end(engine, prompt, STEPS), want)


def test_the_page_programs_lower_for_cuda_and_write_the_pool_in_place():
    """The gather and scatter programs of saves and loads as a GPU would compile them (no GPU here): the
    scatter writes into the donated pool (aliased: no copy of the pool)."""
    pool = KVCache(*(jax.ShapeDtypeStruct((1, 32, 8, 4096, 128), jnp.bfloat16) for _ in range(2)))
    slots = jax.ShapeDtypeStruct((64, 16), jnp.int32)
    pages = KVCache(*(jax.ShapeDtypeStruct((64, 32, 8, 16, 128), jnp.bfloat16) for _ in range(2)))
    gather = jax.jit(gather_pages_program).trace(pool, slots).lower(lowering_platforms=("cuda",)).as_text()
    scatter = jax.jit(scatter_pages_program, donate_argnums=0).trace(pool, slots, pages)
    text = scatter.lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.gather" in gather and "stablehlo.scatter" in text
    assert text.count("tf.aliasing_output") == 2  # K and V of the pool are written in place


def test_a_waiting_request_finds_its_prefix_prefetched_from_host_memory():
    """One sequence at a time: while a request runs, the next one waits, and its prefix is loaded from the
    host tier into a pool beside the running decodes; its prefill then finds those pages on the device
    (no load at its launch), and its outputs equal those without any cache."""
    engine = _engine(2, max_num_seqs=1, host_prefetch=True)
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, 256, 29).tolist()
    want = run_to_end(engine, prompt, STEPS)
    evict_all(engine, rng)
    tier = engine.prefix_cache.tier
    busy = engine.add_request(rng.integers(3, 256, 9).tolist(), greedy_params(8, logprobs=0))
    engine.step()  # its prefill
    req = engine.add_request(prompt, greedy_params(STEPS, logprobs=0))
    while not busy.finished:
        engine.step()
        assert req.status.name == "WAITING" or busy.finished  # one sequence at a time
    assert tier.stats.prefetched_pages == 7 and tier.stats.hits == 0
    while not req.finished:
        engine.step()
    _same(req, want)
    assert req.cached_tokens == 28 and tier.stats.hits == 0  # found on the device: nothing loaded at launch
    assert engine.kv_used_tokens == 0
    for pool in engine.pools:
        pool.check()
    tier.check()


def test_prefetching_never_undoes_a_preemption():
    """Tiny pools, outputs longer than admission planned for: requests are preempted to free room. A
    preempted request's prefix is not prefetched back into that room (the two would alternate for ever):
    every request finishes, with prefetching on, in single steps and in bursts."""
    limits = {"max_model_len": 128, "output_estimate": 8, "host_prefetch": True}
    engine = tiny_esp_engine(num_instances=2, kv_tokens=96, limits=limits)
    for steps in (1, 8):
        engine.ecfg = dataclasses.replace(engine.ecfg, decode_steps=steps)
        engine.prefix_cache.flush()
        rng = np.random.default_rng(5)
        shared = rng.integers(3, 256, 40).tolist()
        prompts = [shared + rng.integers(3, 256, n).tolist() for n in (3, 20, 1, 30)] + [shared + [9]]
        reqs = [engine.add_request(p, SamplingParams(max_tokens=None, temperature=0.0)) for p in prompts]
        for _ in range(2000):
            if not engine.has_unfinished():
                break
            engine.step()
        assert all(r.finished for r in reqs) and engine.kv_used_tokens == 0
    assert engine.stats.preemptions > 0  # (the prefetching itself: the test before)
