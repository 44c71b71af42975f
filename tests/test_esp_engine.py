"""The elastic engine driven by its policy: mixed workloads, scale-down/up, and the compile-free steady state."""

from __future__ import annotations

import numpy as np
from esp_helpers import greedy_params, tiny_esp_engine

from loong_jax import SamplingParams
from loong_jax.api import warmup_jobs


def _drive(engine, waves, rng):
    """Submit waves of requests between steps (arrivals over time) and run until all finish."""
    reqs = []
    for wave in waves:
        reqs += [engine.add_request(rng.integers(3, 256, n).tolist(), params) for n, params in wave]
        for _ in range(3):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    return reqs


def test_policy_serves_a_mixed_workload_exactly():
    rng = np.random.default_rng(0)
    waves = [[(n, greedy_params(m)) for n, m in zip(rng.integers(1, 120, 5), rng.integers(1, 30, 5))] for _ in range(3)]
    engine = tiny_esp_engine(num_instances=8, kv_tokens=64, page_size=4)  # small pools: spreads and scale-ups
    reqs = _drive(engine, waves, np.random.default_rng(1))
    single = tiny_esp_engine(num_instances=1, kv_tokens=2048)
    for r in reqs:
        ref = single.add_request(r.prompt_ids, greedy_params(r.max_new_tokens))
        while not ref.finished:
            single.step()
        assert r.output_ids == ref.output_ids
    s = engine.stats
    assert s.scale_downs >= 1 and s.scale_ups >= 1 and max(s.prefill_degrees) > 1 and max(s.decode_degrees) > 1
    assert engine.kv_used_tokens == 0 and engine.executor.migrations == 0


def test_no_compile_after_warmup():
    limits = dict(max_model_len=512, max_num_seqs=8, max_prefill_tokens=256)
    engine = tiny_esp_engine(num_instances=4, kv_tokens=256, page_size=8, seed=0, limits=limits)
    ecfg = engine.ecfg
    jobs = warmup_jobs(ecfg)
    assert engine.executor.warmup(jobs, show=False) == len(jobs)
    compiled = engine.executor.programs.compiles
    rng = np.random.default_rng(2)
    waves = []
    for _ in range(4):
        lengths = rng.choice([1, 5, 17, 60, 130, 250], size=4)
        params = [
            SamplingParams(max_tokens=int(m), temperature=float(t), top_p=float(p), seed=int(s))
            for m, t, p, s in zip(rng.integers(1, 40, 4), [0, 0.8, 1.0, 0], [1, 0.9, 1, 1], rng.integers(0, 99, 4))
        ]
        waves.append(list(zip(lengths, params)))
    reqs = _drive(engine, waves, rng)
    assert all(r.finished for r in reqs)
    assert len(set(engine.stats.prefill_degrees)) > 1 and len(set(engine.stats.decode_degrees)) >= 1
    assert engine.executor.programs.compiles == compiled, "the steady state compiled a program"
