"""The prefix cache in the engine: prompts that start like earlier ones reuse their K/V wherever it lies and
give exactly the tokens and log-probabilities of computing everything; under memory pressure cached pages
are evicted, never pages in use, and nothing fails for lack of room the cache holds."""

from __future__ import annotations

import numpy as np
import pytest
from esp_helpers import greedy_params, smollm2_on_8_instances, tiny_esp_engine

from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

STEPS = 8
SYSTEM = (
    "You are a careful assistant for a lighthouse museum. Answer visitors' questions about lighthouses, their "
    "keepers, lenses and lamps, shipwrecks and the sea, in two or three plain sentences, and say so when you "
    "do not know."
)
QUESTIONS = ["Who kept the lights burning?", "How does a Fresnel lens work?", "Why are lighthouses striped?"]


def _same(got, want):
    """Same greedy tokens, log-probabilities within 1e-4."""
    assert got.output_ids == want.output_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


@pytest.fixture(scope="module")
def llm():
    return smollm2_on_8_instances()


def _with_cache(llm, enabled, fn):
    """Run fn with the prefix cache on or off, starting from an empty cache."""
    cache = llm.engine.prefix_cache
    cache.flush()
    cache.enabled = enabled
    try:
        return fn()
    finally:
        cache.enabled = True
        cache.flush()


def _hand_built(llm, prompts, group, plans, chunk=None):
    """Each prompt in turn, prefilled on the group with its plan (in passes of `chunk` tokens if given) and
    decoded there (masters rotating)."""
    engine, d, out = llm.engine, len(group), []
    for prompt, plan in zip(prompts, plans):
        req = engine.add_request(prompt, greedy_params(STEPS, logprobs=0))
        while not req.output_ids:
            work = PrefillWork(group, [req], [np.asarray(plan, np.int32)], None if chunk is None else [chunk])
            engine.execute(Iteration(prefills=[work]))
        step = 0
        while not req.finished:
            engine.execute(Iteration(decodes=[DecodeWork(group, [req], [step % d])]))
            step += 1
        out.append(req)
    assert engine.kv_used_tokens == 0
    return out


@pytest.mark.parametrize("group", [(3,), tuple(range(8))], ids=["1", "8"])
def test_hits_anywhere_in_the_group_are_exact(llm, group):
    """A shared system prompt with different questions, then the next turn of the first conversation: the
    first conversation's K/V lies on two of the group's instances (split at a page boundary); the later
    prompts prefill their new tokens on another one."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    asks = [llm.chat_prompt_ids(first)] + [
        llm.chat_prompt_ids([first[0], {"role": "user", "content": q}]) for q in QUESTIONS[1:]
    ]
    d, split = len(group), 32  # the first prompt: 2 pages on rank 0, the rest on rank 1

    def plans(prompts):
        first_plan = np.minimum(np.arange(len(prompts[0])) >= split, d - 1)
        return [first_plan] + [np.full(len(p), d - 1) for p in prompts[1:]]

    def run():
        reqs = _hand_built(llm, asks, group, plans(asks))
        answer = llm.tokenizer.decode(reqs[0].output_ids, True)
        turn = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And after that?"}]
        nxt = llm.chat_prompt_ids(turn)
        return reqs + _hand_built(llm, [nxt], group, [np.full(len(nxt), d - 1)])

    want = _with_cache(llm, False, run)
    got = _with_cache(llm, True, run)
    for g, w in zip(got, want):
        _same(g, w)
    page = llm.engine.ecfg.page_size
    assert got[0].cached_tokens == 0
    system_pages = len(llm.chat_prompt_ids([first[0]])) // page
    for r in got[1:3]:  # the system prompt (and the template's first tokens) came from the cache
        assert r.cached_tokens >= system_pages * page
    assert got[3].cached_tokens >= len(asks[0]) // page * page  # the whole first turn
    if d > 1:
        assert got[3].cached_tokens > split  # the hit spans two instances


@pytest.mark.parametrize("group", [(2,), tuple(range(8))], ids=["1", "8"])
def test_chunked_prompts_and_their_cached_prefixes_are_exact(llm, group):
    """A long document prefilled in passes of 128 tokens (as the scheduler runs a prompt longer than one
    pass), each appending to the K/V of the passes before wherever the plan put it; then a question about
    it, which finds the document's pages in the cache and computes only the rest. Tokens and
    log-probabilities are those of whole prefills without the cache."""
    doc = " ".join(f"Keeper {k} lit the lamp at dusk and logged the weather." for k in range(40))
    first = llm.chat_prompt_ids([{"role": "system", "content": doc}, {"role": "user", "content": "Summarise."}])
    second = llm.chat_prompt_ids([{"role": "system", "content": doc}, {"role": "user", "content": "Who was first?"}])
    engine, prompts = llm.engine, [first, second]
    plans = [np.arange(len(p), dtype=np.int32) // 16 % len(group) for p in prompts]  # page by page over the group
    want = _with_cache(llm, False, lambda: _hand_built(llm, prompts, group, plans))
    got = _with_cache(llm, True, lambda: _hand_built(llm, prompts, group, plans, chunk=128))
    assert len(first) > 3 * 128
    for g, w in zip(got, want):
        _same(g, w)
    page = engine.ecfg.page_size
    shared = next(k for k, (a, b) in enumerate(zip(first, second)) if a != b) // page * page
    assert got[0].cached_tokens == 0 and got[1].cached_tokens == shared


def test_the_engine_loop_reuses_prefixes_exactly(llm):
    """Through the scheduler: a repeated prompt, a shared system prompt with different questions, and a
    three-turn conversation, each request after the first finding its prefix wherever the earlier ones left
    it."""

    def run():
        reqs, messages = [], [{"role": "system", "content": SYSTEM}]
        for q in QUESTIONS:
            messages.append({"role": "user", "content": q})
            req = llm.engine.add_request(llm.chat_prompt_ids(messages), greedy_params(STEPS, logprobs=0))
            while not req.finished:
                llm.engine.step()
            messages.append({"role": "assistant", "content": llm.tokenizer.decode(req.output_ids, True)})
            reqs.append(req)
        ask = llm.chat_prompt_ids([messages[0], {"role": "user", "content": "What is a lamp room?"}])
        for _ in range(2):  # the same prompt twice
            req = llm.engine.add_request(ask, greedy_params(STEPS, logprobs=0))
            while not req.finished:
                llm.engine.step()
            reqs.append(req)
        assert llm.engine.kv_used_tokens == 0
        return reqs

    want = _with_cache(llm, False, run)
    stats = llm.engine.prefix_cache.stats
    hits_before = stats.hits
    got = _with_cache(llm, True, run)
    for g, w in zip(got, want):
        _same(g, w)
    assert all(r.cached_tokens > 0 for r in got[1:]) and stats.hits - hits_before == len(got) - 1
    page = llm.engine.ecfg.page_size
    assert got[-1].cached_tokens == (len(got[-1].prompt_ids) - 1) // page * page  # all but the last partial page


def test_cache_salts_never_share_a_page_and_change_no_output(llm):
    """Requests with different cache salts (or none) never find or hold each other's pages, even running side
    by side; a request with the same salt as an earlier one hits; every output is the uncached one."""
    engine = llm.engine
    prompt = llm.chat_prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}])

    def run(salts):
        reqs = [engine.add_request(prompt, greedy_params(STEPS, logprobs=0, cache_salt=s)) for s in salts]
        while not all(r.finished for r in reqs):
            engine.step()
            for pool in engine.pools:  # pages held by requests of different salts: never the same page
                for a in reqs:
                    for b in reqs:
                        if a.params.cache_salt != b.params.cache_salt:
                            assert not set(pool.pages.get(a.rid, ())) & set(pool.pages.get(b.rid, ()))
        return reqs

    (want,) = _with_cache(llm, False, lambda: run([None]))

    def salted():
        first = run(["tenant-a"])
        return first + run(["tenant-a", "tenant-b", None])

    a1, a2, b, plain = _with_cache(llm, True, salted)
    for got in (a1, a2, b, plain):
        _same(got, want)
    assert a1.cached_tokens == b.cached_tokens == plain.cached_tokens == 0 and a2.cached_tokens > 0
    assert a1.page_keys[: len(a2.page_keys)] == a2.page_keys[: len(a1.page_keys)]
    assert not set(a1.page_keys) & set(b.page_keys) and not set(a1.page_keys) & set(plain.page_keys)


def _assert_pools_consistent(engine):
    for pool in engine.pools:
        pool.check()


def test_eviction_under_memory_pressure_keeps_pages_in_use_and_fails_nothing():
    """A randomised stream of prompts sharing a few prefixes on pools that hold a handful of requests: the
    cache fills them, pages are evicted to make room, every request finishes with the outputs of a run
    without the cache, and the bookkeeping is consistent after every step."""
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 256, n).tolist() for n in (30, 45, 60)]
    prompts = [prefixes[rng.integers(3)] + rng.integers(3, 256, rng.integers(1, 20)).tolist() for _ in range(40)]
    tokens = rng.integers(1, 12, len(prompts))
    waves = np.split(np.arange(len(prompts)), [6, 14, 20, 30])

    def run(engine):
        out = {}
        for wave in waves:
            reqs = {int(k): engine.add_request(prompts[k], greedy_params(int(tokens[k]))) for k in wave}
            while engine.has_unfinished():
                engine.step()
                _assert_pools_consistent(engine)
            out.update(reqs)
        assert all(r.finish_reason == "length" for r in out.values())
        assert engine.kv_used_tokens == 0
        return [out[k].output_ids for k in range(len(prompts))]

    plain = tiny_esp_engine(num_instances=4, kv_tokens=96, page_size=4, limits={"max_model_len": 96})
    plain.prefix_cache.enabled = False
    want = run(plain)
    engine = tiny_esp_engine(num_instances=4, kv_tokens=96, page_size=4, limits={"max_model_len": 96})
    got = run(engine)
    assert got == want
    assert engine.prefix_cache.stats.hits > 0 and engine.prefix_cache.evictions > 0
    engine.prefix_cache.flush()
    assert all(p.free_pages == p.num_pages for p in engine.pools)
