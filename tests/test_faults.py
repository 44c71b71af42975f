"""Fault isolation in the engine: a program that fails fails only its own requests, and admission never
lets one request block or fail another. Faults are injected into the real engine and executor."""

from __future__ import annotations

import numpy as np
import pytest
from esp_helpers import greedy_params, tiny_esp_engine

from loong_jax.engine import RequestRejected
from loong_jax.model.sampling import SamplingParams
from loong_jax.runtime.request import Status
from loong_jax.scheduling.policy import IdleFirstPolicy, SharedComputePolicy


def _run(engine, limit=2000):
    for _ in range(limit):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


def _single_outputs(prompts, tokens):
    """Greedy outputs of each prompt alone on a fresh one-instance engine."""
    engine = tiny_esp_engine(num_instances=1, kv_tokens=1024)
    reqs = [engine.add_request(p, greedy_params(tokens)) for p in prompts]
    _run(engine)
    return [r.output_ids for r in reqs]


class Poison:
    """Wraps an executor method: raises for launches holding a poisoned request, else runs the real one."""

    def __init__(self, method, poisoned: set[int], when: str = "dispatch"):
        self.method, self.poisoned, self.when = method, poisoned, when
        self.fired = 0

    def __call__(self, work, pools):
        if not any(r.rid in self.poisoned for r in work.requests):
            return self.method(work, pools)
        self.fired += 1
        if self.when == "dispatch":
            raise OverflowError("injected: a sampler input does not fit its dtype")
        launch = self.method(work, pools)  # the program really runs; fetching its result fails
        real = launch.pending

        class Failing:
            def ready(self):
                return real.ready()

            def result(self):
                raise RuntimeError("injected: the device program failed")

        launch.pending = Failing()
        return launch


@pytest.mark.parametrize("when", ["dispatch", "result"])
def test_a_failing_prefill_fails_only_its_own_requests(when):
    engine = tiny_esp_engine(num_instances=2, kv_tokens=256, page_size=4, limits=dict(max_model_len=256))
    engine.policy = IdleFirstPolicy(2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (12, 30, 7)]
    bad = engine.add_request(prompts[0], greedy_params(6))
    engine.executor.prefill = Poison(engine.executor.prefill, {bad.rid}, when)
    engine.step()  # the poisoned request's prefill starts (and fails) alone
    good = [engine.add_request(p, greedy_params(6)) for p in prompts[1:]]
    _run(engine)
    assert bad.finish_reason == "error" and "injected" in bad.error and bad.output_ids == []
    assert [r.finish_reason for r in good] == ["length", "length"]
    assert [r.output_ids for r in good] == _single_outputs(prompts[1:], 6)
    assert engine.kv_used_tokens == 0 and engine._reserved_pages == 0 and engine.stats.failed_launches == 1
    assert not engine.launches and not engine.running and not engine.waiting


def test_a_decode_step_that_fails_leaves_other_groups_running():
    engine = tiny_esp_engine(num_instances=2, kv_tokens=256, page_size=4, limits=dict(max_model_len=256))
    engine.policy = IdleFirstPolicy(2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, n).tolist() for n in (20, 25)]
    a = engine.add_request(prompts[0], greedy_params(8))
    engine.step()
    b = engine.add_request(prompts[1], greedy_params(8))  # its own instance: an independent decode group
    engine.executor.decode = Poison(engine.executor.decode, {a.rid}, "result")
    _run(engine)
    assert a.finish_reason == "error" and 1 <= len(a.output_ids) < 8
    assert b.finish_reason == "length" and b.output_ids == _single_outputs(prompts[1:], 8)[0]
    assert engine.kv_used_tokens == 0


def test_pools_a_failed_program_destroyed_are_replaced_and_their_other_requests_recomputed():
    engine = tiny_esp_engine(num_instances=1, kv_tokens=512, page_size=4, limits=dict(max_model_len=256))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 256, n).tolist() for n in (15, 18)]
    keep = engine.add_request(prompts[0], greedy_params(40))
    for _ in range(4):  # keep is decoding (in bursts of 8), its KV in instance 0's pool
        engine.step()
    assert keep.status is Status.RUNNING and len(keep.output_ids) >= 1
    bad = engine.add_request(prompts[1], greedy_params(10))
    real = engine.executor.prefill

    def destroy(work, pools):
        if bad in work.requests:
            for x in engine.executor.instances.pools[0]:
                x.delete()  # as if the failed program had consumed (donated) the pool
            raise RuntimeError("injected: the program failed after taking the pool")
        return real(work, pools)

    engine.executor.prefill = destroy
    _run(engine)
    assert bad.finish_reason == "error"
    assert keep.preemptions == 1 and keep.finish_reason == "length"  # its KV was lost: recomputed exactly
    assert keep.output_ids == _single_outputs(prompts[:1], 40)[0]
    assert engine.kv_used_tokens == 0


def test_a_request_no_group_can_hold_is_refused_at_once_and_others_are_not():
    """A policy that prefills on one instance of 256 tokens (a partial page kept free): a 300-token prompt
    is refused when it arrives, with the limit; a 200-token one is served."""
    engine = tiny_esp_engine(num_instances=3, kv_tokens=256, page_size=4, limits=dict(max_model_len=480))
    engine.policy = SharedComputePolicy(3)
    with pytest.raises(RequestRejected, match=r"at most 252 prompt tokens \(256 KV tokens per instance\)"):
        engine.add_request([5] * 300, greedy_params(2))
    assert not engine.waiting
    ok = engine.add_request([5] * 200, greedy_params(2))
    _run(engine)
    assert ok.finish_reason == "length"


def test_a_long_request_that_does_not_fit_yet_waits_while_the_short_ones_run():
    """Three instances of 256 tokens; five short requests, then a long one of higher priority that only
    fits two empty instances: nobody fails, the long one runs when there is room."""
    engine = tiny_esp_engine(num_instances=3, kv_tokens=256, page_size=4, limits=dict(max_model_len=480))
    rng = np.random.default_rng(3)
    short = [engine.add_request(rng.integers(3, 256, 20).tolist(), greedy_params(30)) for _ in range(5)]
    for _ in range(3):
        engine.step()
    long = engine.add_request(rng.integers(3, 256, 440).tolist(), greedy_params(4), priority=1)
    _run(engine)
    assert [r.finish_reason for r in short] == ["length"] * 5
    assert long.finish_reason == "length" and len(long.output_ids) == 4


def test_requests_without_max_tokens_do_not_reserve_the_whole_context():
    engine = tiny_esp_engine(
        num_instances=1, kv_tokens=4096, page_size=16, limits=dict(max_model_len=2048, max_num_seqs=64)
    )
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request([7] * 20, params) for _ in range(32)]
    for _ in range(3):
        engine.step()
    running = [r for r in reqs if r.status is Status.RUNNING]
    per_request = -(-(20 + engine.ecfg.output_estimate) // 16) + 1  # pages planned for each
    assert len(running) == 256 // per_request == 13  # reserving the rest of the context: 256 // 130 = 1
    assert all(r.max_new_tokens == 2028 for r in reqs)  # the length limit is still the context
    for r in reqs:
        engine.abort(r.rid)
    assert engine.kv_used_tokens == 0
