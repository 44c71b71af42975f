"""Memory-safe start-up: KV pools sized from the memory there is, and what cannot fit refused before allocating."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest
from esp_helpers import tiny_esp_engine

from loong_jax.engine import EngineConfig, sizing_jobs
from loong_jax.runtime.jax_executor import HELD_SLOT_BYTES
from loong_jax.runtime.memory import (
    MIN_PROGRAMS,
    Footprint,
    GiB,
    MemoryDomain,
    count_memory_maps,
    host_available_bytes,
    memory_map_room,
    peak_rss_bytes,
    program_limit,
    size_host_tier,
    size_kv_pools,
)
from loong_jax.runtime.program_cache import ProgramCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = Footprint(weight_bytes=538_000_000, temp_bytes=80_000_000, kv_bytes_per_token=46080)


def host(capacity: float, in_use: float, devices: int) -> MemoryDomain:
    return MemoryDomain("host", int(capacity * GiB), int(in_use * GiB), tuple(range(devices)), True)


def gpu(i: int, capacity: float, in_use: float = 0.0) -> MemoryDomain:
    return MemoryDomain(f"cuda:{i}", int(capacity * GiB), int(in_use * GiB), (i,), False)


def test_host_memory_is_shared_by_every_virtual_device():
    cap = size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16)
    budget = int(0.5 * 24 * GiB)  # the CPU default
    room = budget - int(1.5 * GiB) - 8 * (SMOL.weight_bytes + SMOL.temp_bytes)
    assert cap.tokens_per_instance == room // (8 * SMOL.kv_bytes_per_token * 16) * 16
    assert cap.tokens_per_instance % 16 == 0 and cap.how == "sized from memory" and cap.utilization == 0.5
    capped = size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16, useful_tokens=1000)
    assert capped.tokens_per_instance == 1008 and capped.how.endswith("capped at what one instance can use")
    assert cap.total_tokens == 8 * cap.tokens_per_instance
    assert cap.bytes_per_instance == cap.tokens_per_instance * 46080
    used = 1.5 * GiB + 8 * (SMOL.weight_bytes + SMOL.temp_bytes + cap.bytes_per_instance)
    assert budget - 8 * 16 * 46080 < used <= budget  # filled to within a page per instance
    one = size_kv_pools([host(24, 1.5, 1)], SMOL, num_instances=1, tp=1, page_size=16)
    assert one.tokens_per_instance > 7 * cap.tokens_per_instance  # one instance gets (nearly) all of it
    less = size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16, utilization=0.4)
    assert less.tokens_per_instance < 0.6 * cap.tokens_per_instance


def test_compiled_programs_count_against_the_host_memory_only():
    programs = dataclasses.replace(SMOL, program_bytes=2 * GiB)
    without = size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16)
    with_programs = size_kv_pools([host(24, 1.5, 8)], programs, num_instances=8, tp=1, page_size=16)
    assert with_programs.program_bytes == 2 * GiB
    assert abs((without.tokens_per_instance - with_programs.tokens_per_instance) * 8 * 46080 - 2 * GiB) < 8 * 16 * 46080
    on_gpu = size_kv_pools([gpu(0, 80)], programs, num_instances=1, tp=1, page_size=16)
    assert on_gpu.program_bytes == 0
    plain = size_kv_pools([gpu(0, 80)], SMOL, num_instances=1, tp=1, page_size=16)
    assert on_gpu.tokens_per_instance == plain.tokens_per_instance


def test_each_accelerator_has_its_own_memory_and_the_fullest_one_decides():
    domains = [gpu(0, 80, in_use=10), gpu(1, 80), gpu(2, 80), gpu(3, 80)]
    fp = Footprint(weight_bytes=7 * GiB, temp_bytes=GiB, kv_bytes_per_token=262144)  # tp=2: half of each
    cap = size_kv_pools(domains, fp, num_instances=2, tp=2, page_size=16)
    room = int(0.9 * 80 * GiB) - 10 * GiB - 8 * GiB  # device 0: default 0.9, 10 GiB already in use
    assert cap.tokens_per_instance == room // (262144 * 16) * 16
    assert cap.domain == "cuda:0" and cap.bytes_per_token == 2 * 262144


def test_an_explicit_pool_is_honoured_when_it_fits_and_refused_with_the_numbers_when_not():
    cap = size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16, requested_tokens=16384)
    assert cap.tokens_per_instance == 16384 and cap.how == "given (kv_tokens_per_instance)"
    with pytest.raises(ValueError) as e:  # the old default: 65,536 tokens x 8 instances = 22.5 GiB
        size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16, requested_tokens=65536)
    msg = str(e.value)
    assert "kv_tokens_per_instance=65,536 does not fit" in msg and "22.50 GiB of KV cache" in msg
    assert "allows 12.00 GiB" in msg and "memory_utilization 0.5" in msg
    fits = int(re.search(r"kv_tokens_per_instance <= ([\d,]+)", msg).group(1).replace(",", ""))
    assert fits == size_kv_pools([host(24, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16).tokens_per_instance


def test_the_host_tier_takes_a_share_of_what_the_pools_leave_or_what_is_asked_if_it_fits():
    page = 1 << 20
    assert size_host_tier(None, page, 8 * GiB) == 2048  # a quarter of 8 GiB
    assert size_host_tier(None, page, 8 * GiB, host_pools=4 * GiB) == 1024  # pools in host memory (CPU)
    assert size_host_tier(0, page, 8 * GiB) == 0 and size_host_tier(1.5, page, 8 * GiB) == 1536
    with pytest.raises(ValueError, match=r"host_kv_cache_gib=9 does not fit.*8.00 GiB available.*<= 8.00"):
        size_host_tier(9, page, 8 * GiB)
    with pytest.raises(ValueError, match=r"KV pools take 6.00 GiB.*<= 2.00"):
        size_host_tier(3, page, 8 * GiB, host_pools=6 * GiB)
    with pytest.raises(ValueError, match=">= 0"):
        size_host_tier(-1, page, 8 * GiB)


def test_no_room_at_all_and_bad_fractions_are_errors():
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        size_kv_pools([host(8, 1.5, 8)], SMOL, num_instances=8, tp=1, page_size=16)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"memory_utilization must be in \(0, 1\]"):
            size_kv_pools([host(24, 1, 1)], SMOL, num_instances=1, tp=1, page_size=16, utilization=bad)
        with pytest.raises(ValueError, match="memory_utilization"):
            EngineConfig(max_model_len=64, memory_utilization=bad)


def test_a_pool_too_small_for_one_request_of_max_model_len_is_refused():
    ok = EngineConfig(max_model_len=8192, num_instances=8, kv_tokens_per_instance=2048)
    ok.check_fits_one_request()  # elastic: a prompt may spread over 8 instances
    with pytest.raises(ValueError, match=r"max_model_len=8,192 .* at most 1 instance\(s\)"):
        shared = EngineConfig(max_model_len=8192, num_instances=8, kv_tokens_per_instance=2048, policy="shared")
        shared.check_fits_one_request()
    with pytest.raises(ValueError, match="at most 4 instance"):  # aligned groups: the largest block of 6 is 4
        EngineConfig(max_model_len=8192, num_instances=6, kv_tokens_per_instance=2048).check_fits_one_request()


def test_an_explicit_pool_that_cannot_fit_fails_before_allocating():
    before = peak_rss_bytes()
    too_many = host_available_bytes() // (2 * 2 * 16 * 4) * 2  # tiny model: 256 bytes of KV per token
    with pytest.raises(ValueError, match="does not fit") as e:
        tiny_esp_engine(num_instances=2, kv_tokens=too_many, page_size=16)
    assert "GiB" in str(e.value)
    assert peak_rss_bytes() - before < GiB  # nothing large was allocated; this process is still here


def test_compiled_programs_are_bounded_by_the_memory_mappings_left():
    # an XLA CPU program of SmolLM2 maps about 300 regions; a process has 65,530 by default
    assert program_limit(300, room=60_000, wanted=100) == 100
    assert program_limit(300, room=20_000, wanted=100) == 50  # 0.75 of the room
    assert program_limit(300, room=None, wanted=100) == 100  # the system does not say: no bound
    with pytest.raises(ValueError, match=r"vm.max_map_count.*room for 3 programs"):
        program_limit(300, room=1_200, wanted=100)
    assert MIN_PROGRAMS > 3


def test_an_evicted_program_gives_its_memory_mappings_back():
    cache = ProgramCache(max_programs=2)

    def f(x):
        for i in range(20):
            x = jnp.sort(jnp.tanh(x @ x.T + i), axis=0)
        return x

    def compile_some(first: int) -> None:
        for n in range(first, first + 6):
            cache.get(("f", n), f, (jnp.ones((16 + n, 16 + n)),))

    compile_some(0)
    settled = count_memory_maps()
    compile_some(100)  # six more programs, four evicted: the mappings must not grow with them
    assert cache.evictions == 10 and len(cache) == 2
    assert count_memory_maps() - settled < 60, "evicted programs kept their code mapped"
    assert memory_map_room() is None or memory_map_room() > 0


def test_sized_engine_reports_its_capacity_and_temporaries_do_not_grow_with_the_pool():
    engine = tiny_esp_engine(num_instances=2, kv_tokens=None, limits=dict(max_num_seqs=4, max_model_len=512))
    cap = engine.kv_capacity
    assert cap.how == "sized from memory, capped at what one instance can use"
    assert engine.ecfg.kv_tokens_per_instance == cap.tokens_per_instance == 4 * (512 + 4)  # a partial page each
    assert engine.pools[0].num_slots == cap.tokens_per_instance > 0
    assert engine.executor.instances.pools[0].k.shape[3] == cap.tokens_per_instance
    assert cap.temp_bytes > 0 and cap.weight_bytes > 0
    jobs = sizing_jobs(engine.ecfg)
    small, large = (engine.executor.footprint(jobs, num_slots=s) for s in (None, 16 * 8192))
    # only the held-slot lists grow with the pool, and they are counted with each token's bytes
    assert 0 < small.temp_bytes <= large.temp_bytes <= small.temp_bytes + HELD_SLOT_BYTES * 16 * 8192
    assert small.kv_bytes_per_token == engine.executor.instances.kv_bytes_per_token_per_device() + HELD_SLOT_BYTES


def readme_python_example() -> str:
    """The README's Python API example (its block that imports loong_jax), exactly as written there."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("```python\nfrom loong_jax import") + len("```python\n")
    return text[start : text.index("```\n", start)]


@pytest.mark.fresh_host
def test_readme_example_runs_with_the_defaults_within_the_memory_it_asked_for():
    """The example that the out-of-memory killer used to stop (8 instances of the old 65,536-token default)
    runs as written in a fresh process; its peak resident memory stays within its memory_utilization."""
    report = textwrap.dedent(
        """
        import json
        from loong_jax.runtime.memory import peak_rss_bytes
        print("\\nREPORT " + json.dumps({**llm.kv_capacity.as_dict(), "peak_rss": peak_rss_bytes(),
                                      "text": out[0].text, "texts": [o.text for o in outs]}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", readme_python_example() + report],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    r = json.loads(line[len("REPORT ") :])
    assert r["how"] == "sized from memory" and r["utilization"] == 0.5 and r["domain"] == "host"
    assert r["num_instances"] == 8 and r["tokens_per_instance"] >= 2048
    assert r["text"] and all(r["texts"])
    print(
        f"capacity {r['tokens_per_instance']} tokens/instance, peak {r['peak_rss'] / GiB:.2f} GiB, "
        f"budget {r['budget_bytes'] / GiB:.2f} GiB"
    )
    assert r["peak_rss"] <= r["budget_bytes"]


def test_a_checkpoint_too_large_for_the_host_is_refused_before_its_weights_are_read(tmp_path):
    pytest.importorskip("torch")
    from helpers import save_tiny_hf

    from checkpoints import load_checkpoint
    from loong_jax.model.llama import CheckpointError

    path = str(tmp_path / "huge")
    save_tiny_hf(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, vocab_size=128256)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)  # about 400B parameters, while the files hold a tiny model's tensors
    before = peak_rss_bytes()
    with pytest.raises(CheckpointError, match=r"needs about [\d.]+ GiB of host memory, but [\d.]+ GiB are available"):
        load_checkpoint(path, "float32")
    assert peak_rss_bytes() - before < GiB
