"""Decode bursts: K decode steps per launch, each sampled token fed back on the device, give exactly the
tokens and log-probabilities of one step per launch, whatever stops a request (EOS, a stop token, max_tokens,
min_tokens, a stop string inside a burst, an abort), on groups of 1, 4 and 8 instances with several masters
and scale-ups between bursts, through the scheduler with preemption and prefix hits; seeded sampling is the
same whatever K; the slots a burst did not use are released."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from esp_helpers import tiny_esp_engine

from loong_jax import SamplingParams
from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

GROUPS = {"1": (5,), "4": (0, 1, 2, 3), "8": tuple(range(8))}


@pytest.fixture(scope="module")
def engine():
    return tiny_esp_engine(num_instances=8, kv_tokens=256)


def _hand_built(engine, prompts, params, group, steps, abort_after=None):
    """Prefill every prompt on the group (tokens spread over it), then decode in bursts of `steps` with the
    masters moving one rank on each burst (a master that holds none of a request's K/V scales it up). Returns
    the requests; every pool is checked after every launch and is empty at the end."""
    d = len(group)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    plans = [np.arange(len(p), dtype=np.int32) * 7 % d for p in prompts]
    engine.execute(Iteration(prefills=[PrefillWork(group, reqs, plans)]))
    burst = 0
    while not all(r.finished for r in reqs):
        live = [r for r in reqs if not r.finished]
        work = DecodeWork(group, live, [(i + burst) % d for i in range(len(live))], steps)
        if abort_after is not None and burst == abort_after:
            engine.launch(Iteration(decodes=[work]))
            engine.abort(live[0].rid)  # while its burst runs: its tokens are dropped, its slots freed
            engine.execute(Iteration())  # wait for the burst
        else:
            engine.execute(Iteration(decodes=[work]))
        for pool in engine.pools:
            pool.check()
        burst += 1
    assert engine.kv_used_tokens == 0
    return reqs


def _same(got, want):
    for g, w in zip(got, want):
        assert (g.output_ids, g.finish_reason, g.stop_reason) == (w.output_ids, w.finish_reason, w.stop_reason)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        assert [[t for t, _ in top] for top in g.top_logprobs] == [[t for t, _ in top] for top in w.top_logprobs]
        np.testing.assert_allclose(
            [[v for _, v in top] for top in g.top_logprobs], [[v for _, v in top] for top in w.top_logprobs], atol=1e-5
        )


@pytest.mark.parametrize("group", GROUPS.values(), ids=GROUPS.keys())
def test_bursts_equal_single_steps_whatever_stops_a_request(engine, group):
    rng = np.random.default_rng(len(group))
    prompts = [rng.integers(3, 256, n).tolist() for n in (9, 23, 14, 31, 5)]
    greedy = dict(temperature=0.0, logprobs=2, ignore_eos=True)
    free = _hand_built(engine, prompts, [SamplingParams(max_tokens=20, **greedy)] * 5, group, 1)
    stop_at = [r.output_ids[6] for r in free]  # tokens the requests sample: stops that really happen
    eos = free[4].output_ids[3]
    params = [
        SamplingParams(max_tokens=11, **greedy),  # max_tokens, not a multiple of the burst
        SamplingParams(max_tokens=20, stop_token_ids=[stop_at[1]], **greedy),  # a stop token inside a burst
        SamplingParams(max_tokens=20, stop_token_ids=[stop_at[2]], min_tokens=9, **greedy),  # not before 9
        SamplingParams(max_tokens=3, **greedy),  # ends inside the first burst
        SamplingParams(max_tokens=20, temperature=0.0, logprobs=2),  # EOS (below)
    ]
    engine.eos_ids, before = (eos,), engine.eos_ids
    try:
        want = _hand_built(engine, prompts, params, group, 1)
        for steps in (4, 8):
            _same(_hand_built(engine, prompts, params, group, steps), want)
    finally:
        engine.eos_ids = before
    assert [(len(r.output_ids), r.finish_reason) for r in (want[0], want[3])] == [(11, "length"), (3, "length")]
    assert want[1].finish_reason == "stop" and want[1].output_ids[-1] == want[1].stop_reason == stop_at[1]
    assert len(want[2].output_ids) >= 10 and stop_at[2] not in want[2].output_ids[:9]
    assert want[4].finish_reason == "stop" and want[4].output_ids[-1] == eos and want[4].stop_reason is None


def test_seeded_sampling_is_the_same_whatever_the_burst(engine):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (12, 19, 7)]
    params = [
        SamplingParams(max_tokens=17, temperature=1.0, seed=1, top_p=0.9, logprobs=1),
        SamplingParams(max_tokens=17, temperature=0.8, seed=2, top_k=20, repetition_penalty=1.3, min_tokens=4),
        SamplingParams(max_tokens=17, temperature=1.2, seed=3, min_p=0.05, logit_bias={7: 5.0}, presence_penalty=1),
    ]
    want = _hand_built(engine, prompts, params, GROUPS["4"], 1)
    _same(_hand_built(engine, prompts, params, GROUPS["4"], 8), want)


def test_an_abort_inside_a_burst_frees_its_slots_and_leaves_the_others_exact(engine):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 256, n).tolist() for n in (15, 26)]
    params = [SamplingParams(max_tokens=24, temperature=0.0, logprobs=0)] * 2
    want = _hand_built(engine, prompts, params, GROUPS["4"], 1)
    got = _hand_built(engine, prompts, params, GROUPS["4"], 8, abort_after=1)
    assert got[0].finish_reason == "abort" and len(got[0].output_ids) == 1 + 8  # the first burst's tokens only
    _same(got[1:], want[1:])


def test_the_scheduler_decodes_in_bursts_with_preemption_and_prefix_hits():
    """The elastic scheduler on 2 instances whose pools hold a few requests: prompts sharing a prefix (hits),
    outputs longer than admission planned for (preemption and recomputation); bursts of up to 8 (single
    steps while a prompt that could start waits) give the outputs of single steps."""

    limits = {"max_model_len": 128, "output_estimate": 8}
    engine = tiny_esp_engine(num_instances=2, kv_tokens=96, limits=limits)

    def run(steps):
        engine.ecfg = dataclasses.replace(engine.ecfg, decode_steps=steps)
        engine.prefix_cache.flush()
        rng = np.random.default_rng(5)
        shared = rng.integers(3, 256, 40).tolist()
        prompts = [shared + rng.integers(3, 256, n).tolist() for n in (3, 20, 1, 30)] + [shared + [9]]
        reqs = [engine.add_request(p, SamplingParams(max_tokens=None, temperature=0.0, logprobs=0)) for p in prompts]
        stats = dataclasses.replace(engine.stats)
        while engine.has_unfinished():
            engine.step()
        assert engine.kv_used_tokens == 0
        return reqs, engine.stats.decode_launches - stats.decode_launches, engine.stats.preemptions - stats.preemptions

    want, single_launches, _ = run(1)
    hits = engine.prefix_cache.stats.hits
    got, burst_launches, preemptions = run(8)
    _same(got, want)
    assert preemptions > 0 and engine.prefix_cache.stats.hits > hits
    assert burst_launches < single_launches / 1.5  # bursts, and single steps while a prompt that fits waits


def test_a_stop_string_inside_a_burst_cuts_the_text_and_frees_the_k_v_after_it(smol_llm):
    """The host sees stop strings: it cuts the text where one ends inside a burst, never takes back text it
    streamed, and the K/V of the burst's tokens after the stop is released."""
    engine = smol_llm.engine
    prompt = smol_llm.tokenizer.encode("Count: one, two, three, four,")
    whole = smol_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = whole.text[10:13]
    outputs = {}
    for steps in (1, 8):
        engine.ecfg, before = dataclasses.replace(engine.ecfg, decode_steps=steps), engine.ecfg
        try:
            req = engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0, stop=[stop], logprobs=0))
            streamed = ""
            while not req.finished:
                engine.step()
                streamed += req.take_text_delta()
            streamed += req.take_text_delta()
        finally:
            engine.ecfg = before
        assert streamed == req.text == whole.text[: whole.text.index(stop)] and req.finish_reason == "stop"
        assert engine.kv_used_tokens == 0
        outputs[steps] = (req.output_ids, req.logprobs)
    assert outputs[1][0] == outputs[8][0]  # the tokens the burst sampled after the stop string are dropped
    np.testing.assert_allclose(outputs[8][1], outputs[1][1], atol=1e-4)


def _serve_on_one_instance(arrivals_per_step: int, prompt: int = 200, **limits):
    """64 requests (prompts of `prompt` tokens, 64 new tokens) arriving a few per engine step at one
    instance with room for all of them; returns the engine and the requests once all finished."""
    limits = dict(max_num_seqs=64, max_model_len=512, max_prefill_tokens=2048, decode_steps=4, **limits)
    engine = tiny_esp_engine(num_instances=1, kv_tokens=32768, limits=limits)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, prompt).tolist() for _ in range(64)]
    reqs = []
    while len(reqs) < len(prompts) or engine.has_unfinished():
        for p in prompts[len(reqs) : len(reqs) + arrivals_per_step]:
            reqs.append(engine.add_request(p, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)))
        engine.step()
    assert all(r.finish_reason == "length" for r in reqs) and engine.kv_used_tokens == 0
    return engine, reqs


def test_decode_batches_grow_as_requests_arrive():
    """New requests join the running decode batch (the pause for their prefill weighs everyone queued behind
    them, not only the ones one pass takes): the batch grows past one prefill pass (10 prompts) towards
    max_num_seqs instead of running in waves; 64 short prompts arriving at once all decode together. (The
    built-in cost model prices the tiny model's prefills like a real model's: a pause is a real trade.)"""
    engine, _ = _serve_on_one_instance(arrivals_per_step=1)
    assert max(engine.stats.decode_batches) > 16, engine.stats.decode_batches
    engine, _ = _serve_on_one_instance(arrivals_per_step=64, prompt=40)
    assert max(engine.stats.decode_batches) == 64, engine.stats.decode_batches
    engine, _ = _serve_on_one_instance(arrivals_per_step=64, prompt=40, max_batch_requests=4)  # admitted per decision
    assert engine.stats.prefills >= 16


def _served(engine, prompts, params, steps, abort_in_flight=False):
    """The requests served through `Engine.step` with bursts of up to `steps`; with abort_in_flight, the first
    is aborted once two of its bursts are in flight (one continuing the other). Pools are checked after every
    step and are empty at the end. Returns the requests and how many bursts were chained."""
    # bursts whatever the step times seen (on a busy machine a slow step would turn them into single steps)
    engine.ecfg = dataclasses.replace(engine.ecfg, decode_steps=steps, max_burst_s=60.0)
    chained = engine.stats.chained_launches
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
        if abort_in_flight and not reqs[0].finished and any(x.follows in engine.launches for x in engine.launches):
            engine.abort(reqs[0].rid)
        for pool in engine.pools:
            pool.check()
    assert engine.kv_used_tokens == 0
    return reqs, engine.stats.chained_launches - chained


def test_bursts_dispatched_before_the_last_is_read_are_exact(engine):
    """With nothing to decide (no prompt waiting, only decode bursts running), a group's next burst is
    dispatched before the running one's tokens are read, starting from the state that burst leaves on the
    device (last tokens, stopped rows, sampler state): outputs equal single steps whatever stops a request
    (max_tokens, a stop token, min_tokens, EOS; seeded sampling with penalties), and an abort while two
    bursts are in flight frees everything and leaves the other requests exact."""
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 256, n).tolist() for n in (9, 23, 14, 31, 5)]
    greedy = dict(temperature=0.0, logprobs=2, ignore_eos=True)
    free, _ = _served(engine, prompts, [SamplingParams(max_tokens=30, **greedy)] * 5, 1)
    stop_at = [r.output_ids[12] for r in free]
    eos = free[4].output_ids[17]
    params = [
        SamplingParams(max_tokens=27, **greedy),
        SamplingParams(max_tokens=30, stop_token_ids=[stop_at[1]], **greedy),  # inside a chained burst
        SamplingParams(max_tokens=30, stop_token_ids=[stop_at[2]], min_tokens=14, **greedy),
        SamplingParams(max_tokens=30, temperature=0.9, seed=4, top_k=30, repetition_penalty=1.2, logprobs=1),
        SamplingParams(max_tokens=30, temperature=0.0, logprobs=2),  # EOS (below)
    ]
    engine.eos_ids, before = (eos,), engine.eos_ids
    try:
        want, _ = _served(engine, prompts, params, 1)
        got, chained = _served(engine, prompts, params, 4)
        _same(got, want)
        assert chained >= 3, chained
        aborted, _ = _served(engine, prompts, params, 4, abort_in_flight=True)
        assert aborted[0].finish_reason == "abort"
        _same(aborted[1:], want[1:])
    finally:
        engine.eos_ids = before
        engine.ecfg = dataclasses.replace(engine.ecfg, decode_steps=1)
    assert want[1].finish_reason == want[4].finish_reason == "stop" and want[4].output_ids[-1] == eos


def test_a_waiting_prompt_stops_the_bursts():
    """A prompt that arrives while a group decodes in chained bursts waits only for the bursts in flight:
    from then on, until its prefill starts, decode launches are single steps and none is chained."""
    engine = tiny_esp_engine(num_instances=1, kv_tokens=1024, limits=dict(max_model_len=256, decode_steps=8))
    rng = np.random.default_rng(7)
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    first = engine.add_request(rng.integers(3, 256, 20).tolist(), params)
    while engine.stats.chained_launches < 2:
        engine.step()
    late = engine.add_request(rng.integers(3, 256, 20).tolist(), params)
    tokens_then, chained = len(first.output_ids), engine.stats.chained_launches
    in_flight = {id(x) for x in engine.launches}
    while True:
        engine.step()
        if late.output_ids:  # prefilled: nothing waits any more
            break
        for x in engine.launches:
            if x.kind == "decode" and id(x) not in in_flight:
                assert x.work.steps == 1
                in_flight.add(id(x))
    assert engine.stats.chained_launches == chained and not first.finished
    while engine.has_unfinished():
        engine.step()
    assert first.finish_reason == late.finish_reason == "length" and len(first.output_ids) > tokens_then


def test_bursts_that_would_last_too_long_run_as_single_steps():
    """Until a decode step has been timed, and where a burst would then last longer than max_burst_s, decode
    launches are single steps (a prompt arriving would wait for the burst); the outputs stay the same."""
    limits = dict(max_model_len=128, decode_steps=8, max_burst_s=1e-6)
    engine = tiny_esp_engine(num_instances=1, kv_tokens=256, limits=limits)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    req = engine.add_request([5, 6, 7, 8, 9], params)
    steps, seen = [], set()
    while engine.has_unfinished():
        engine.step()
        for x in engine.launches:
            if x.kind == "decode" and id(x) not in seen:
                seen.add(id(x))
                steps.append(x.work.steps)
    assert set(steps) == {1} and len(req.output_ids) == 30
    engine.ecfg = dataclasses.replace(engine.ecfg, max_burst_s=60.0)
    again = engine.add_request([5, 6, 7, 8, 9], params)
    launches = engine.stats.decode_launches
    while engine.has_unfinished():
        engine.step()
    assert again.output_ids == req.output_ids and engine.stats.decode_launches - launches < 10  # bursts
