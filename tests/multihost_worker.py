"""One process of a multi-process test: joins the run, plays a scenario, prints one JSON line of results.

Run by tests/test_multihost.py as `python multihost_worker.py SCENARIO COORDINATOR NUM_PROCESSES PROCESS_ID
LOCAL_DEVICES`; pytest imports only its constants.
"""

from __future__ import annotations

import json
import sys


def migrate_across_processes() -> dict:
    """KV moved by the real migrate program between instances of different processes and of one process,
    on the real Instances layout of a tiny model (8 instances, 4 per process)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from loong_jax.model.config import tiny_config
    from loong_jax.model.llama import Llama
    from loong_jax.runtime.instances import SP, Instances
    from loong_jax.runtime.kv_pool import KVCache
    from loong_jax.runtime.programs import MigrateInputs, migrate_program

    cfg = tiny_config()
    _, state = nnx.split(Llama(cfg, jnp.float32, nnx.Rngs(0)))
    inst = Instances(cfg, state, num_instances=8, tp=1, dtype=jnp.float32)
    slots = 64
    inst.allocate(state, slots)
    shape = (1, cfg.num_layers, cfg.num_kv_heads, slots, cfg.head_dim)
    for i in range(8):  # instance i's pool holds the value i + slot / 100 everywhere
        if inst.local[i]:
            value = i + np.arange(slots, dtype=np.float32)[None, None, None, :, None] / 100
            full = np.ascontiguousarray(np.broadcast_to(value, shape))  # K and V: two buffers from the host
            inst.pools[i] = KVCache(*(jax.device_put(full, inst.sharding((i,), inst.pool_spec)) for _ in range(2)))

    def migrate(src: int, dst: int, src_slots: list[int], dst_slots: list[int]) -> None:
        group = (src, dst)
        if not any(inst.local[i] for i in group):
            return  # processes outside a group do not touch it
        n = len(src_slots)
        inp = MigrateInputs(np.full((2, n), slots, np.int32), np.full((2, n), slots, np.int32))
        inp.src_slots[0], inp.dst_slots[1] = src_slots, dst_slots
        inp = jax.device_put(inp, inst.sharding(group, P(SP)))
        fn = jax.jit(functools.partial(migrate_program, inst.mesh(group), inst.pool_spec), donate_argnums=(0,))
        inst.put_group_pools(group, fn(inst.group_pools(group), inp))

    migrate(1, 6, [3, 4, 5, 6], [10, 11, 12, 13])  # process 0 -> process 1
    migrate(5, 7, [0, 1, 2, 3], [20, 21, 22, 23])  # inside process 1 only
    migrate(2, 0, [8, 9, 10, 11], [30, 31, 32, 33])  # inside process 0 only
    out = {}
    for i in range(8):
        if inst.local[i]:
            k = np.asarray(inst.pools[i].k)[0, -1, -1, :, 0]
            out[i] = [round(float(x), 2) for x in k]
    return out


def plan_round_trips() -> dict:
    """The leader sends 100 decode-step-sized plans (batch 16, page tables of 64 pages); every follower
    checks each, in order, and answers with 16 "tokens"; the leader reads every answer. Then a follower
    waits for a plan that never comes and must get a PeerTimeout, not a hang."""
    import time

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from loong_jax.multihost.channel import PeerTimeout, PlanChannel

    channel = PlanChannel.from_jax(timeout_s=20)
    rng = np.random.default_rng(0)
    steps, seconds = 100, []
    for seq in range(steps):
        plan = {"kind": "decode", "group": [0, 1, 2, 3], "tokens": rng.integers(0, 50000, 16).astype(np.int32)}
        plan.update(
            page_table=rng.integers(0, 4096, (16, 64)).astype(np.int32), positions=np.arange(16, dtype=np.int32)
        )
        if jax.process_index() == 0:
            t0 = time.perf_counter()
            channel.publish(seq, plan)
            answers = channel.replies(seq)
            seconds.append(time.perf_counter() - t0)
            assert all((a["tokens"] == plan["tokens"] + seq).all() for a in answers)
            channel.forget(seq)
        else:
            got = channel.receive(seq)
            assert got["kind"] == "decode" and (got["page_table"] == plan["page_table"]).all()
            channel.reply(seq, {"tokens": got["tokens"] + seq})
    out = {"steps": steps}
    if jax.process_index() == 0:
        out["round_trip_ms_median"] = float(np.median(seconds) * 1000)
    else:
        quick = PlanChannel(channel.client, channel.process_id, channel.num_processes, timeout_s=1)
        t0 = time.perf_counter()
        try:
            quick.receive(steps + 1)
            out["timeout"] = "none"
        except PeerTimeout as e:
            out["timeout"] = str(e)
        out["waited_s"] = time.perf_counter() - t0
    multihost_utils.sync_global_devices("done")
    return out


LAYOUT_STEPS = 24
LAYOUT_QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "List some facts about the Moon.",
]


def layouts_across_processes() -> dict:
    """Greedy SmolLM2 on 8 instances under hand-built layouts that cross the process boundary when run as
    2 processes x 4 devices (instances 0-3 on process 0, 4-7 on process 1): a ring prefill on 2-5 whose
    KV lands on 3 (process 0), on 3 and 4 (both) and on 5 (process 1); decodes whose requests' KV lies on
    both processes, with masters alternating across the boundary; a migration from 5 to 1; a scale-up of
    request 0 from 3 onto 6; then all 8 instances in bursts, one chained to the one before. The leader
    reports the tokens and KV use."""
    import numpy as np

    from loong_jax import LLM, SamplingParams
    from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork

    llm = LLM(
        num_instances=8,
        kv_tokens_per_instance=1024,
        max_model_len=2048,
        max_num_seqs=8,
        seed=0,
        compilation_cache_dir=None,
        heartbeat_timeout_s=60,
    )
    if llm.is_follower:
        llm.follow()
        return {"followed": True}
    engine = llm.engine
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in LAYOUT_QUESTIONS]
    params = SamplingParams(max_tokens=LAYOUT_STEPS, temperature=0.0, ignore_eos=True, logprobs=0)
    reqs = [engine.add_request(p, params) for p in prompts]
    n1 = len(prompts[1])
    plans = [[1] * len(prompts[0]), [1] * (n1 // 2) + [2] * (n1 - n1 // 2), [3] * len(prompts[2])]
    engine.execute(Iteration(prefills=[PrefillWork((2, 3, 4, 5), reqs, [np.asarray(p, np.int32) for p in plans])]))
    for step in range(12):
        if step == 8:  # request 2's KV from instance 5 (process 1) to 1 (process 0)
            engine.migrate(reqs[2].rid, 5, 1, engine.pools[5].tokens[reqs[2].rid])
        if step < 8:
            group, masters = (3, 4, 5), [0, step % 2, 2]
        else:
            group, masters = (1, 3, 4, 6), [3, 1 + step % 2, 0]  # request 0's new tokens on 6
        engine.execute(Iteration(decodes=[DecodeWork(group, reqs, masters)]))
    # then all 8 instances in bursts of 4 (the first compiles the program); the third is dispatched before
    # the second is read: each process continues from its own part of the state the second leaves (it stops
    # at max_tokens, after 3 steps)
    everyone = (tuple(range(8)), reqs, [0, 3, 5])
    engine.execute(Iteration(decodes=[DecodeWork(*everyone, steps=4)]))
    engine.launch(Iteration(decodes=[DecodeWork(*everyone, steps=4)]))
    chained = engine._chain()
    engine.execute(Iteration())
    out = {
        "chained": chained,
        "tokens": [r.output_ids for r in reqs],
        "logprobs": [r.logprobs for r in reqs],
        "finished": all(r.finished for r in reqs),
        "kv_used": [pool.used_tokens for pool in engine.pools],
        "migrations": engine.executor.migrations,
    }
    llm.close()
    return out


def mismatched_models() -> dict:
    """Process 1 loads a model with one layer more than process 0's: both must refuse, naming it."""
    import jax
    from esp_helpers import tiny_esp_engine

    try:
        tiny_esp_engine(num_instances=2, kv_tokens=64, num_layers=2 + jax.process_index())
        return {"error": None}
    except ValueError as e:
        return {"error": str(e)}


HOST_TIER_STEPS = 6
HOST_TIER_PAGE_BYTES = 2 * 2 * 2 * 4 * 16 * 4  # K and V of a page of the tiny model: 2 layers, 2 heads, 4 x 16


def host_tier_prompts() -> list[list[int]]:
    """Two histories, then each history with a new turn after it."""
    import numpy as np

    rng = np.random.default_rng(11)
    history = [rng.integers(3, 256, 21).tolist() for _ in range(2)]
    return history + [h + rng.integers(3, 256, 5).tolist() for h in history]


def host_tiers_per_process() -> dict:
    """A tiny model on 4 instances (0-1 on process 0, 2-3 on process 1), each process with a host tier of
    its instances' evicted pages. History 0 is computed on instance 2 (process 1) and history 1 on instance 1
    (process 0); every pool is then emptied; the next turns run on groups spanning both processes, each
    loading its history from the tier of the process that computed it. The leader reports the outputs and
    each tier's counters; the follower how many pages its store received."""
    import numpy as np
    from esp_helpers import evict_all, run_to_end, tiny_esp_engine

    from loong_jax.multihost.channel import PlanChannel
    from loong_jax.multihost.follower import Follower

    gib = 64 * HOST_TIER_PAGE_BYTES / 2**30
    limits = {"max_model_len": 60, "max_prefill_tokens": 60, "host_kv_cache_gib": gib}
    engine = tiny_esp_engine(num_instances=4, kv_tokens=64, page_size=4, limits=limits)
    store = engine.executor.host_store
    if engine.executor.peers is None:
        Follower(engine.executor, PlanChannel.from_jax()).run()
        return {"followed": True, "filed_pages": store.filed_pages, "capacity": store.capacity}
    prompts, steps = host_tier_prompts(), HOST_TIER_STEPS
    first = [
        run_to_end(engine, prompts[0], steps, (2,), np.zeros(21)),
        run_to_end(engine, prompts[1], steps, (1,), np.zeros(21)),
    ]
    evict_all(engine, np.random.default_rng(0))
    half = np.where(np.arange(26) < 13, 0, 1)
    later = [
        run_to_end(engine, prompts[2], steps, (1, 2), half),  # history 0 loads onto 2, its process's instance
        run_to_end(engine, prompts[3], steps, (0, 3), half),  # history 1 onto 0
    ]
    tiers = [engine.prefix_cache.tiers[i] for i in (0, 2)]
    engine.executor.peers.stop()
    return {
        "tokens": [r.output_ids for r in first + later],
        "logprobs": [r.logprobs for r in first + later],
        "cached": [r.cached_tokens for r in first + later],
        "hits": [t.stats.hits for t in tiers],
        "loaded_bytes": [t.stats.loaded_bytes for t in tiers],
        "tier_pages": [t.pages for t in tiers],
        "capacity": [t.capacity for t in tiers],
        "same_tier": tiers[0] is tiers[1],
        "filed_pages": store.filed_pages,
        "kv_used": engine.kv_used_tokens,
    }


SCENARIOS = {
    "host_tier": host_tiers_per_process,
    "mismatch": mismatched_models,
    "migrate": migrate_across_processes,
    "plan": plan_round_trips,
    "layouts": layouts_across_processes,
}


def main() -> None:
    scenario, coordinator, num, pid, local = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    from loong_jax.multihost import Distributed, initialize, shutdown

    initialize(Distributed(coordinator, num, pid), local_cpu_devices=local, timeout_s=60)
    result = SCENARIOS[scenario]()
    print("RESULT " + json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
