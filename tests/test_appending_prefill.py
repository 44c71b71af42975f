"""Appending ring prefill: a prompt prefilled in chunks, each attending to the K/V the chunks before it left
in the group's pools (wherever they lie) and merging by log-sum-exp, gives the tokens and log-probabilities
of one whole prefill."""

from __future__ import annotations

import numpy as np
import pytest
from esp_helpers import greedy_params, tiny_esp_engine

from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

STEPS = 6


def _run(engine, prompts, plans, group, chunks):
    """Prefill the prompts on the group in passes of the given chunk sizes (None: whole), then decode."""
    reqs = [engine.add_request(p, greedy_params(STEPS, logprobs=0)) for p in prompts]
    plans = [np.asarray(p, np.int32) for p in plans]
    for chunk in chunks:
        live = [i for i, r in enumerate(reqs) if not r.output_ids]
        work = PrefillWork(group, [reqs[i] for i in live], [plans[i] for i in live], None if chunk is None else chunk)
        engine.execute(Iteration(prefills=[work]))
    assert all(len(r.output_ids) == 1 for r in reqs)
    for step in range(STEPS - 1):
        engine.execute(
            Iteration(decodes=[DecodeWork(group, reqs, [(i + step) % len(group) for i in range(len(reqs))])])
        )
    out = [(r.output_ids, r.logprobs) for r in reqs]
    assert engine.kv_used_tokens == 0
    return out


@pytest.fixture(scope="module")
def engine():
    return tiny_esp_engine(num_instances=4, kv_tokens=1024)


@pytest.mark.parametrize("group", [(0,), (0, 1, 2, 3)])
def test_chunks_append_to_the_kv_before_them(engine, group):
    rng = np.random.default_rng(1)
    d = len(group)
    prompts = [rng.integers(3, 256, n).tolist() for n in (45, 30)]
    plans = [rng.integers(0, d, 45), [d - 1] * 10 + [0] * 20]  # K/V scattered, and on two instances
    whole = _run(engine, prompts, plans, group, [None])
    # three passes: 16 + 16 + 13 tokens of the first prompt, 16 + 14 of the second (which ends a pass early)
    chunked = _run(engine, prompts, plans, group, [[16, 16], [16, 14], [13]])
    for (ids, lps), (ref_ids, ref_lps) in zip(chunked, whole):
        assert ids == ref_ids
        np.testing.assert_allclose(lps, ref_lps, atol=1e-4)


def test_a_chunk_whose_earlier_kv_lies_outside_the_group_is_refused(engine):
    req = engine.add_request(list(range(3, 40)), greedy_params(2))
    plan = np.zeros(37, np.int32)
    engine.execute(Iteration(prefills=[PrefillWork((0,), [req], [plan], [16])]))
    engine.execute(Iteration(prefills=[PrefillWork((1,), [req], [plan], [21])]))
    assert req.finish_reason == "error" and "must include every instance holding its K/V" in req.error
    assert engine.kv_used_tokens == 0
