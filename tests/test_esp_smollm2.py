"""Greedy SmolLM2 generation on elastic groups of 8 virtual instances equals single-instance generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from esp_helpers import greedy_params, smollm2_on_8_instances

from loong_jax import SamplingParams, StructuredOutput
from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

STEPS = 64
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "List some facts about the Moon.",
]


@pytest.fixture(scope="module")
def esp_llm():
    return smollm2_on_8_instances()


@pytest.fixture(scope="module")
def expected(smol_llm):
    """Single-instance greedy outputs (the reference)."""
    prompts = [smol_llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = smol_llm.generate(prompts, greedy_params(STEPS))
    return prompts, [o.token_ids for o in outs]


def run_scenario(llm, prompts, group, plans, decode_layout):
    """Prefill `prompts` on `group` with `plans`, then decode; decode_layout(step) -> (group, masters)."""
    engine = llm.engine
    reqs = [engine.add_request(p, greedy_params(STEPS)) for p in prompts]
    plans = [np.asarray(plan, np.int32) for plan in plans]
    engine.execute(Iteration(prefills=[PrefillWork(group, reqs, plans)]))
    for step in range(STEPS - 1):
        g, masters = decode_layout(step)
        engine.execute(Iteration(decodes=[DecodeWork(g, reqs, masters)]))
    assert all(r.finished for r in reqs)
    assert engine.kv_used_tokens == 0 and engine.executor.migrations == 0
    return [r.output_ids for r in reqs]


def halves(n, a, b):
    return [a] * (n // 2) + [b] * (n - n // 2)


def test_prefill_on_8_then_decode_on_2(esp_llm, expected):
    prompts, want = expected
    p = prompts[0]
    out = run_scenario(esp_llm, [p], tuple(range(8)), [halves(len(p), 0, 1)], lambda s: ((0, 1), [s % 2]))
    assert out == [want[0]]


def test_prefill_on_4_then_decode_on_1(esp_llm, expected):
    prompts, want = expected
    p = prompts[1]
    out = run_scenario(esp_llm, [p], (4, 5, 6, 7), [[2] * len(p)], lambda s: ((6,), [0]))
    assert out == [want[1]]


def test_decode_scales_up_from_1_to_4(esp_llm, expected):
    prompts, want = expected
    p = prompts[2]

    def layout(step):
        if step < 20:
            return (0,), [0]
        if step < 40:
            return (0, 1), [1]  # a new master: its tokens now land on instance 1
        return (0, 1, 2, 3), [2 + step % 2]

    assert run_scenario(esp_llm, [p], (0,), [[0] * len(p)], layout) == [want[2]]


def test_several_masters_in_one_decode_batch(esp_llm, expected):
    prompts, want = expected
    plans = [[r] * len(p) for r, p in enumerate(prompts)]
    out = run_scenario(
        esp_llm, prompts, (0, 1, 2, 3), plans, lambda s: ((0, 1, 2, 3), [s % 4, (s + 1) % 4, (s + 2) % 4])
    )
    assert out == want


def test_kv_spread_unevenly_over_three_instances(esp_llm, expected):
    prompts, want = expected
    p = prompts[0]
    n = len(p)
    a, b = int(0.6 * n), int(0.3 * n)
    plan = [1] * a + [0] * b + [2] * (n - a - b)  # 60% on instance 5, 30% on 2, 10% on 7
    out = run_scenario(esp_llm, [p], (2, 5, 7), [plan], lambda s: ((2, 5, 7), [1]))
    assert out == [want[0]]


def test_a_structured_output_across_masters_and_after_preemption(esp_llm, smol_llm):
    """A constrained greedy request with its K/V spread over two instances and its master alternating, then
    preempted (its K/V dropped) and recomputed by the scheduler: the matcher follows, and the output is the
    single instance's, token for token."""
    schema = {
        "type": "object",
        "properties": {"river": {"type": "string", "maxLength": 20}, "km": {"type": "integer", "minimum": 0}},
        "required": ["river", "km"],
        "additionalProperties": False,
    }
    params = SamplingParams(max_tokens=40, temperature=0, structured_output=StructuredOutput(json_schema=schema))
    prompt = smol_llm.chat_prompt_ids([{"role": "user", "content": "Name a long river and its length as JSON."}])
    want = smol_llm.generate([prompt], params)[0].token_ids
    engine = esp_llm.engine
    req = engine.add_request(prompt, params)
    engine.execute(Iteration(prefills=[PrefillWork((0, 1, 2, 3), [req], [np.asarray(halves(len(prompt), 0, 1))])]))
    for step in range(6):  # masters 0 and 1 in turn: multi-master decode over the K/V on both
        engine.execute(Iteration(decodes=[DecodeWork((0, 1), [req], [step % 2])]))
    assert not req.finished and len(req.output_ids) == 7
    engine._preempt(req)  # recomputed later: its prompt and the tokens so far, prefilled again
    while engine.has_unfinished():
        engine.step()
    assert req.output_ids == want and req.preemptions == 1
    assert set(json.loads(req.text)) == {"river", "km"}
