"""Striped ring prefill with proactive scale-down on 8 virtual devices, against the single-device model."""

from __future__ import annotations

import numpy as np
import pytest
from esp_helpers import greedy_params, pool_tokens, reference_kv, reference_logprobs, tiny_esp_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from loong_jax.runtime.placement import busiest_first_plan
from loong_jax.runtime.work import Iteration, PrefillWork

LENGTHS = [3, 37, 1, 20, 9]  # mixed, some shorter than the degree, none a multiple of it


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in lengths]


def _prefill(engine, group, prompts, plans=None, logprobs=20):
    reqs = [engine.add_request(p, greedy_params(4, logprobs=logprobs)) for p in prompts]
    pools = [engine.pools[i] for i in group]
    plans = plans if plans is not None else busiest_first_plan([len(p) for p in prompts], pools)
    engine.execute(Iteration(prefills=[PrefillWork(tuple(group), reqs, plans)]))
    return reqs, plans


def _check_logprobs(engine, prompts, reqs):
    for p, r in zip(prompts, reqs):
        ref = reference_logprobs(engine, p)
        assert r.output_ids[0] == int(np.argmax(ref))
        top = r.top_logprobs[0]
        # the reference's best values, each reported for its own token (tokens within 1e-4 of each other may
        # come in either order: a random tiny model has near-ties among 20 candidates)
        np.testing.assert_allclose([lp for _, lp in top], np.sort(ref)[::-1][: len(top)], atol=1e-4)
        np.testing.assert_allclose([ref[t] for t, _ in top], [lp for _, lp in top], atol=1e-4)
        assert len({t for t, _ in top}) == len(top)


def _check_pools(engine, group, prompts, reqs, plans):
    for p, r, plan in zip(prompts, reqs, plans):
        ref_k, ref_v = reference_kv(engine, p)
        for rank, inst in enumerate(group):
            mine = np.nonzero(plan == rank)[0]  # the plan, honoured token by token
            assert engine.pools[inst].tokens.get(r.rid, 0) == len(mine)
            if len(mine):
                k, v = pool_tokens(engine, inst, r.rid)
                np.testing.assert_allclose(k, ref_k[:, mine], atol=1e-5)
                np.testing.assert_allclose(v, ref_v[:, mine], atol=1e-5)
        others = set(range(engine.ecfg.num_instances)) - set(group)
        assert all(engine.pools[i].tokens.get(r.rid, 0) == 0 for i in others)


@pytest.fixture(scope="module")
def engine8():
    return tiny_esp_engine(num_instances=8)


DEGREES = [
    (0,),
    (3, 4),
    (0, 1, 2),
    (4, 5, 6, 7),
    (1, 3, 5, 7, 0),
    (6, 2, 4, 0, 7, 1),
    (0, 1, 2, 3, 4, 5, 6),
    tuple(range(8)),
]


@pytest.mark.parametrize("group", DEGREES)
def test_prefill_logprobs_at_every_degree(engine8, group):
    prompts = _prompts(LENGTHS, seed=len(group))
    reqs, _ = _prefill(engine8, group, prompts)
    _check_logprobs(engine8, prompts, reqs)
    for r in reqs:
        engine8.abort(r.rid)
    assert engine8.kv_used_tokens == 0


@pytest.mark.parametrize("num_kv_heads", [2, 1])  # 2: heads sharded over tp; 1: attention replicated
@pytest.mark.parametrize("group", [(0,), (2, 1), (3, 0, 2), (0, 1, 2, 3)])
def test_prefill_with_tensor_parallel_instances(group, num_kv_heads):
    engine = tiny_esp_engine(num_instances=4, tp=2, num_kv_heads=num_kv_heads)
    prompts = _prompts(LENGTHS, seed=11)
    reqs, plans = _prefill(engine, group, prompts)
    _check_logprobs(engine, prompts, reqs)
    _check_pools(engine, group, prompts, reqs, plans)


def test_busiest_first_plan_and_pool_contents(engine8):
    group = (5, 2, 7)
    prompts = _prompts([30, 12, 7], seed=3)
    # make instance 7 the busiest and 2 the next, so the plan fills 7 first
    filler = _prefill(engine8, (7,), _prompts([40], seed=4), logprobs=None)[0]
    filler += _prefill(engine8, (2,), _prompts([8], seed=5), logprobs=None)[0]
    pools = [engine8.pools[i] for i in group]
    plans = busiest_first_plan([len(p) for p in prompts], pools)
    assert plans[0][0] == 2  # rank 2 = instance 7, the busiest
    reqs, _ = _prefill(engine8, group, prompts, plans)
    _check_pools(engine8, group, prompts, reqs, plans)
    _check_logprobs(engine8, prompts, reqs)
    for r in reqs + filler:
        engine8.abort(r.rid)


@given(
    d=st.integers(1, 8),
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=12, deadline=None)
def test_any_plan_is_honoured(engine8, d, lengths, seed):
    rng = np.random.default_rng(seed)
    group = tuple(rng.permutation(8)[:d].tolist())
    prompts = _prompts(lengths, seed=seed)
    plans = [rng.integers(0, d, n).astype(np.int32) for n in lengths]
    reqs, _ = _prefill(engine8, group, prompts, plans)
    try:
        _check_pools(engine8, group, prompts, reqs, plans)
        _check_logprobs(engine8, prompts, reqs)
    finally:  # a failing example leaves nothing behind for the next one
        for r in reqs:
            engine8.abort(r.rid)
    assert engine8.kv_used_tokens == 0
