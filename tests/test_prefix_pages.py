"""Shared, cached pages in an instance's page pool: prefix keys, reference counts, eviction of unheld cached
pages least recently released first, and the invariants a randomised workload must keep."""

from __future__ import annotations

import numpy as np
import pytest

from loong_jax.model.sampling import SamplingParams
from loong_jax.prefix import PrefixCache
from loong_jax.runtime.kv_pool import OutOfPages, PagePool, prefix_keys
from loong_jax.runtime.request import Request


def test_prefix_keys_chain_over_everything_before():
    a = prefix_keys(list(range(10)), 4)
    assert len(a) == 2  # full pages only
    assert prefix_keys(list(range(8)) + [99], 4) == a  # same first 8 tokens, same keys
    b = prefix_keys([7] + list(range(1, 10)), 4)
    assert b[0] != a[0] and b[1] != a[1]  # a different first page changes every key after it
    assert prefix_keys(list(range(10)), 4, salt=b"other model") != a


def test_a_shared_page_is_freed_only_when_nobody_holds_it_and_is_reused_until_evicted():
    pool = PagePool(4, 4)
    pool.append(1, 10)  # 3 pages
    keys = prefix_keys(list(range(10)), 4)
    for i, key in enumerate(keys):
        pool.publish(1, i, key)
    with pytest.raises(ValueError, match="not full"):
        pool.publish(1, 2, b"partial")
    pool.share(2, keys)
    assert pool.tokens[2] == 8 and pool.pages[2] == pool.pages[1][:2]
    pool.append(2, 3)  # its own tokens go to a new page after the shared ones
    assert pool.free_pages == 0
    pool.release(1)  # request 2 still holds both shared pages; 1's third page was never cached
    assert pool.free_pages == 1 and len(pool.cached) == 2
    pool.release(2)
    assert pool.free_pages == 4 and len(pool.cached) == 2  # the cached pages count as free but stay cached
    pool.share(3, keys[:1])  # a later request finds its prefix
    assert pool.slots(3).tolist() == list(range(pool.cached[keys[0]] * 4, pool.cached[keys[0]] * 4 + 4))
    pool.append(4, 12)  # needs 3 pages: 2 free ones, then evicts the unheld cached page
    assert pool.evictions == 1 and list(pool.cached) == [keys[0]]
    with pytest.raises(OutOfPages):
        pool.append(5, 1)  # the page request 3 holds is never evicted
    with pytest.raises(KeyError):
        pool.share(6, keys)
    pool.release(3)
    pool.release(4)
    pool.flush()
    assert pool.free_pages == 4 and not pool.cached and pool.used_tokens == 0


def test_eviction_takes_the_least_recently_released_cached_page():
    pool = PagePool(3, 2)
    for rid in range(3):
        pool.append(rid, 2)
        pool.publish(rid, 0, bytes([rid]))
    for rid in (2, 0, 1):
        pool.release(rid)
    pool.append(9, 2)
    assert sorted(pool.cached) == [bytes([0]), bytes([1])]  # request 2's page went first


def test_a_randomised_workload_keeps_the_invariants():
    rng = np.random.default_rng(0)
    pool, page = PagePool(32, 4), 4
    prompts = [rng.integers(0, 5, rng.integers(1, 40)).tolist() for _ in range(12)]
    live: dict[int, int] = {}  # rid -> prompt
    for rid in range(2000):
        if live and rng.random() < 0.5:
            victim = int(rng.choice(list(live)))
            pool.release(victim)
            del live[victim]
            continue
        prompt = prompts[rng.integers(len(prompts))] + rng.integers(0, 5, rng.integers(0, 8)).tolist()
        keys = prefix_keys(prompt, page)
        hit = 0
        while hit < len(keys) and keys[hit] in pool.cached:
            hit += 1
        if hit:
            pool.share(rid, keys[:hit])
        held_before = {p for pages in pool.pages.values() for p in pages}
        try:
            pool.append(rid, len(prompt) - hit * page + 1)
        except OutOfPages:
            pool.release(rid)
            continue
        # no page another request holds was handed out again
        mine = pool.pages[rid][hit:]
        assert not set(mine) & (held_before - set(pool.pages[rid][:hit]))
        for i in range(hit, len(keys)):
            pool.publish(rid, i, keys[i])
        live[rid] = 1
        pool.check()  # reference counts are the holders; nothing held is free, evictable or lost
    assert pool.evictions > 0 and pool.cached  # the workload did reuse and evict
    for rid in list(live):
        pool.release(rid)
    pool.flush()
    assert pool.free_pages == pool.num_pages and not pool._refs and pool.used_tokens == 0


def test_pages_know_which_positions_they_hold_and_only_whole_aligned_pages_can_be_cached():
    pool = PagePool(16, 4)
    pool.append(1, 6, 0)  # positions 0-5: page 0 holds 0-3 (aligned), page 1 holds 4-5 (partial)
    pool.append(1, 2, np.array([6, 7]))  # page 1 now holds 4-7
    assert pool.aligned_pages(1) == [(0, 0), (1, 1)]
    pool.append(2, 6, np.array([2, 3, 4, 5, 6, 7]))  # starts mid-page: page 0 holds 2-5, not a whole page
    assert pool.aligned_pages(2) == []
    pool.append(3, 8, np.array([0, 1, 2, 3, 8, 9, 10, 11]))  # scattered by a plan: pages 0 and 2 of the sequence
    assert pool.aligned_pages(3) == [(0, 0), (1, 2)]
    pool.append(4, 4, None)  # positions unknown (never cached)
    assert pool.aligned_pages(4) == []
    keys = [b"a", b"b", b"c"]
    pool.publish(3, 0, keys[0])
    pool.publish(3, 1, keys[2])
    pool.share(5, [keys[0], keys[2]], [0, 2])
    assert pool.positions(5).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    pool.truncate(1, 2)  # 4-5 stay in page 1
    assert pool.positions(1).tolist() == [0, 1, 2, 3, 4, 5] and pool.aligned_pages(1) == [(0, 0)]


def test_a_cut_never_reopens_a_page_others_read():
    pool = PagePool(8, 4)
    pool.append(1, 8, 0)
    keys = prefix_keys(range(8), 4)
    pool.publish(1, 1, keys[1])
    pool.truncate(1, 2)  # only request 1 holds its cached page 1: it leaves the cache, 1 refills it
    assert keys[1] not in pool.cached
    pool.append(1, 2, 6)
    pool.publish(1, 1, keys[1])
    pool.share(2, [keys[1]], [1])
    with pytest.raises(ValueError, match="shares with other requests"):
        pool.truncate(1, 2)
    pool.truncate(1, 4)  # a whole page may go: request 2 keeps it
    assert pool.cached[keys[1]] == pool.pages[2][0]


def test_a_prefix_cached_on_several_instances_is_taken_from_the_longest_run():
    """A popular first page cached on every instance, the rest of one conversation on instance 2 only: a
    request continuing that conversation finds all of it on instance 2 (its K/V then lies on one instance,
    so its decode steps need no other), and on instances 0 and 1 only the first page."""
    pools = [PagePool(8, 4) for _ in range(3)]
    cache = PrefixCache(pools)
    tokens = list(range(3, 23))  # 5 pages
    keys = prefix_keys(tokens, 4)
    for i, pool in enumerate(pools):
        n = 4 if i < 2 else 16
        pool.append(100 + i, n, 0)
        for j in range(n // 4):
            pool.publish(100 + i, j, keys[j])
    req = Request(1, tokens + [99], SamplingParams(max_tokens=1), 1, seed=0, eos_ids=())
    assert cache.lookup(req, range(3)) == [2, 2, 2, 2]
    assert cache.lookup(req, [0, 1]) == [0]
    assert cache.lookup(req, [1, 2]) == [2, 2, 2, 2]
