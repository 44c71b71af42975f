"""Multi-master decode, scale-up and migration on 8 virtual devices, against single-instance generation."""

from __future__ import annotations

import re

import numpy as np
import pytest
from esp_helpers import greedy_params, pool_tokens, tiny_esp_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork
from loong_jax.scheduling.policy import IdleFirstPolicy


def _run_alone(prompt, steps):
    """Greedy tokens of one request on a single instance (the reference)."""
    e = _single()
    r = e.add_request(prompt, greedy_params(steps))
    while not r.finished:
        e.step()
    return r.output_ids


_cache = {}


def _single():
    if "single" not in _cache:
        _cache["single"] = tiny_esp_engine(num_instances=1, kv_tokens=1024)
    return _cache["single"]


@pytest.fixture(scope="module")
def engine8():
    return tiny_esp_engine(num_instances=8, kv_tokens=256)


def _prefill(engine, group, prompts, plans, steps):
    reqs = [engine.add_request(p, greedy_params(steps)) for p in prompts]
    engine.execute(Iteration(prefills=[PrefillWork(group, reqs, [np.asarray(p, np.int32) for p in plans])]))
    return reqs


def _decode(engine, group, reqs, masters):
    live = [(r, m) for r, m in zip(reqs, masters) if not r.finished]
    if live:
        engine.execute(Iteration(decodes=[DecodeWork(group, [r for r, _ in live], [m for _, m in live])]))


def test_several_masters_and_uneven_spread(engine8):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (30, 17, 44)]
    group = (2, 5, 7)
    plans = [
        [1] * 18 + [0] * 9 + [2] * 3,  # 60% / 30% / 10% on instances 5, 2, 7
        [0] * 17,  # all on instance 2
        rng.integers(0, 3, 44),  # scattered
    ]
    reqs = _prefill(engine8, group, prompts, plans, steps=24)
    for step in range(23):
        _decode(engine8, group, reqs, [step % 3, (step + 1) % 3, 1])  # masters move around the group
    for p, r in zip(prompts, reqs):
        assert r.output_ids == _run_alone(p, 24)
    assert engine8.kv_used_tokens == 0 and engine8.executor.migrations == 0


def test_scale_up_from_one_to_four_instances(engine8):
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 256, 25).tolist()
    (req,) = _prefill(engine8, (4,), [prompt], [[0] * 25], steps=40)
    for _ in range(10):
        _decode(engine8, (4,), [req], [0])
    for _ in range(10):  # a new master on an instance that held nothing of it; no KV moves
        _decode(engine8, (4, 5), [req], [1])
    holders = engine8.holders(req.rid)
    assert holders == {4: 25 + 10, 5: 10}
    for step in range(19):
        _decode(engine8, (4, 5, 6, 7), [req], [2 + step % 2])
    assert req.output_ids == _run_alone(prompt, 40)


def test_migration_moves_the_last_tokens_and_decoding_continues(engine8):
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 256, 33).tolist()
    (req,) = _prefill(engine8, (0,), [prompt], [[0] * 33], steps=12)
    before_k, before_v = pool_tokens(engine8, 0, req.rid)
    engine8.migrate(req.rid, 0, 3, 13)
    assert engine8.holders(req.rid) == {0: 20, 3: 13}
    k3, v3 = pool_tokens(engine8, 3, req.rid)
    np.testing.assert_array_equal(k3, before_k[:, 20:])
    np.testing.assert_array_equal(v3, before_v[:, 20:])
    for step in range(11):
        _decode(engine8, (0, 3), [req], [step % 2])
    assert req.output_ids == _run_alone(prompt, 12)
    assert engine8.executor.migrations == 1


@given(
    d=st.integers(1, 4),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
@settings(max_examples=8, deadline=None)
def test_random_spreads_and_masters_decode_exactly(engine8, d, lengths, seed):
    rng = np.random.default_rng(seed)
    group = tuple(sorted(rng.permutation(8)[:d].tolist()))
    prompts = [rng.integers(3, 256, n).tolist() for n in lengths]
    plans = [rng.integers(0, d, n) for n in lengths]
    reqs = _prefill(engine8, group, prompts, plans, steps=6)
    for _ in range(5):
        _decode(engine8, group, reqs, rng.integers(0, d, len(reqs)).tolist())
    for p, r in zip(prompts, reqs):
        assert r.output_ids == _run_alone(p, 6)
    assert engine8.kv_used_tokens == 0


def test_no_kv_moves_between_prefill_and_decode():
    """The policy-driven engine never migrates, and no collective of a program carries pool-sized data."""
    engine = tiny_esp_engine(num_instances=4, kv_tokens=48, limits=dict(max_model_len=128))  # prompts spread
    engine.policy = IdleFirstPolicy(4)  # one group for all three prompts: scale-down is certain
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (50, 7, 23)]
    reqs = [engine.add_request(p, greedy_params(8)) for p in prompts]
    while any(not r.finished for r in reqs):
        engine.step()
    assert engine.executor.migrations == 0 and engine.stats.scale_downs >= 1
    assert max(engine.stats.decode_degrees) > 1
    for p, r in zip(prompts, reqs):
        assert r.output_ids == _run_alone(p, 8)
    slots = engine.executor.num_slots
    pattern = re.compile(r"= \S+ (all-to-all|all-gather|collective-permute|all-reduce)\(")
    for key, program in engine.executor.programs._programs.items():
        collectives = [line for line in program.as_text().splitlines() if pattern.search(line)]
        assert bool(collectives) == (len(key[1]) > 1)
        if key[0] == "prefill":  # K/V travels round the ring (all-gathers, all-to-alls: an appending pass's queries)
            assert any("collective-permute" in c for c in collectives) == (len(key[1]) > 1)
        if key[0] == "decode":
            assert not any("collective-permute" in c for c in collectives)
        for c in collectives:  # only activations travel: nothing has the pool's slot dimension
            shapes = re.findall(r"\[([\d,]+)\]", c.split("(")[0])
            assert all(str(slots) not in s.split(",") for s in shapes), c


@pytest.mark.parametrize("num_kv_heads", [2, 1])  # heads sharded over tp, or attention replicated
def test_tensor_parallel_instances_decode_exactly(num_kv_heads):
    limits = dict(max_model_len=256)
    engine = tiny_esp_engine(num_instances=4, tp=2, kv_tokens=128, num_kv_heads=num_kv_heads, limits=limits)
    single = tiny_esp_engine(num_instances=1, kv_tokens=1024, num_kv_heads=num_kv_heads)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 256, n).tolist() for n in (19, 40)]
    reqs = _prefill(engine, (3, 1), prompts, [rng.integers(0, 2, 19), [0] * 20 + [1] * 20], steps=10)
    for step in range(9):
        group = (3, 1) if step < 4 else (0, 1, 2, 3)  # scale up to all four instances mid-way
        masters = [step % 2, 1] if step < 4 else [2, 0]
        _decode(engine, group, reqs, masters)
    for p, r in zip(prompts, reqs):
        ref = single.add_request(p, greedy_params(10))
        while not ref.finished:
            single.step()
        assert r.output_ids == ref.output_ids
