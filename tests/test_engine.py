"""Continuous batching, KV accounting, abort and request validation on the single-instance engine."""

from __future__ import annotations

import numpy as np
import pytest
from esp_helpers import tiny_esp_engine

from loong_jax import SamplingParams
from loong_jax.engine import RequestRejected

GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny_engine(kv_tokens=512, max_num_seqs=8, max_prefill_tokens=256, page_size=4):
    max_len = min(256, kv_tokens - 2 * page_size)  # the pool holds one request of max_model_len tokens
    limits = dict(max_model_len=max_len, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens)
    return tiny_esp_engine(num_instances=1, kv_tokens=kv_tokens, page_size=page_size, limits=limits)


def run(engine, reqs):
    while any(not r.finished for r in reqs):
        engine.step()
    return [r.output_ids for r in reqs]


_solo_engine = []


def solo(prompt, max_tokens):
    """Greedy output of one request alone on a fresh pool (one engine reused for all solo runs)."""
    if not _solo_engine:
        _solo_engine.append(tiny_engine())
    e = _solo_engine[0]
    return run(e, [e.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))])[0]


def test_batched_continuous_generation_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 40, 17, 90, 1, 64)]
    budgets = [12, 5, 20, 9, 15, 7]
    engine = tiny_engine(max_prefill_tokens=128)
    first = [engine.add_request(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in zip(prompts[:3], budgets[:3])]
    for _ in range(3):
        engine.step()
    later = [engine.add_request(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in zip(prompts[3:], budgets[3:])]
    outs = run(engine, first + later)
    for p, m, out in zip(prompts, budgets, outs):
        assert out == solo(p, m)
        assert len(out) == m


def test_kv_is_released_and_admission_waits_for_memory():
    engine = tiny_engine(kv_tokens=128, page_size=4)
    reqs = [engine.add_request(list(range(1, 41)), SamplingParams(max_tokens=20, **GREEDY)) for _ in range(5)]
    engine.step()
    running = [r for r in reqs if r.status.value == "running"]
    assert 0 < len(running) < 5  # 5 x 60 tokens cannot be promised at once in 128 slots
    assert engine.kv_used_tokens <= engine.pools[0].num_slots
    run(engine, reqs)
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.kv_used_tokens == 0 and engine.pools[0].free_pages == engine.pools[0].num_pages
    assert engine._reserved_pages == 0 and not engine.has_unfinished()


def test_abort_frees_kv_and_leaves_others_untouched():
    engine = tiny_engine()
    keep = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, **GREEDY))
    drop = engine.add_request(list(range(50)), SamplingParams(max_tokens=50, **GREEDY))
    waiting = engine.add_request([1, 2], SamplingParams(max_tokens=4, **GREEDY))
    engine.step()
    engine.step()
    engine.abort(drop.rid)
    assert drop.finish_reason == "abort" and drop.rid not in engine.pools[0].tokens
    run(engine, [keep, waiting])
    assert keep.output_ids == solo([5, 6, 7], 10)
    assert engine.kv_used_tokens == 0


def test_prompt_longer_than_context_is_rejected_with_the_limit():
    engine = tiny_engine()
    with pytest.raises(RequestRejected, match=r"maximum context length is 256 tokens.*300 tokens \(290 in the prompt"):
        engine.add_request([1] * 290, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestRejected, match=r"\[0, 256\)"):
        engine.add_request([1, 999], SamplingParams())
    assert not engine.has_unfinished()


def test_a_pool_that_cannot_hold_one_request_of_max_model_len_is_refused_at_start():
    with pytest.raises(ValueError, match="cannot hold one request of max_model_len=256"):
        tiny_esp_engine(num_instances=1, kv_tokens=64, page_size=4, limits=dict(max_model_len=256))
    engine = tiny_engine(kv_tokens=64)  # max_model_len 56: what one instance's 64 slots hold
    with pytest.raises(RequestRejected, match="maximum context length is 56"):
        engine.add_request([1] * 50, SamplingParams(max_tokens=10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(temperature=-1), r"temperature must be in \[0, 100\]"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-5), "top_k must be"),
        (dict(min_p=2), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(presence_penalty=-3), "presence_penalty"),
        (dict(seed=-1), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(logprobs=50), "logprobs"),
        (dict(min_tokens=-1), "min_tokens"),
    ],
)
def test_invalid_sampling_params_name_the_value_and_the_allowed_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
