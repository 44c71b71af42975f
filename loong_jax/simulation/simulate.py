"""Replay a workload on a simulated cluster: the real engine loop and policy over the simulated executor.

Requests are added when the virtual clock reaches their arrival; the loop never waits past the next
arrival. Results hold per-request timings and the paper's metrics (normalised latencies, SLO checks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from loong_jax.engine import Engine, EngineConfig, RequestRejected
from loong_jax.model.config import tiny_config
from loong_jax.model.sampling import SamplingParams
from loong_jax.prefix import HostTier
from loong_jax.runtime.timeline import Span
from loong_jax.scheduling.policy import Policy
from loong_jax.simulation.executor import SimExecutor, Timing
from loong_jax.simulation.workloads import WorkloadRequest, prompt_ids


class SimulationStalled(RuntimeError):
    """Requests remain but nothing can run and nothing will arrive: a policy bug."""


@dataclasses.dataclass
class RequestRecord:
    arrival: float
    input_len: int
    output_len: int
    first_token: float | None = None
    finish: float | None = None
    rejected: str | None = None
    preemptions: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(1, self.output_len - 1)


@dataclasses.dataclass
class SimResult:
    records: list[RequestRecord]
    spans: list[Span]
    stats: dict
    duration: float

    @property
    def served(self) -> list[RequestRecord]:
        return [r for r in self.records if r.rejected is None]

    def latencies(self) -> dict[str, float]:
        """The paper's normalised latencies, means over served requests (seconds per token)."""
        s = self.served
        if not s:
            return {"per_token": float("inf"), "input": float("inf"), "output": float("inf")}
        return {
            "per_token": float(np.mean([(r.finish - r.arrival) / (r.input_len + r.output_len) for r in s])),
            "input": float(np.mean([r.ttft / r.input_len for r in s])),
            "output": float(np.mean([r.tpot for r in s])),
        }


@dataclasses.dataclass(frozen=True)
class SimCluster:
    """A simulated deployment: instances, their KV capacity, and the timing model behind them."""

    timing: Timing
    num_instances: int
    kv_tokens_per_instance: int
    max_model_len: int
    page_size: int = 16
    max_num_seqs: int = 256
    max_request_tokens: int | None = None  # larger requests are rejected (e.g. one replica's memory)
    prefix_caching: bool = False  # cache prefix pages (the workload's hash ids say which inputs share them)
    host_tier_tokens: float = 0  # with prefix caching: tokens each host tier keeps (math.inf: no limit)
    host_tiers: int = 1  # separate host tiers, the instances split evenly between them (replicas: one each)
    host_prefetch: bool = True  # waiting requests' prefixes loaded from the host tier ahead of their prefills


def simulate(
    cluster: SimCluster, policy: Policy, workload: Sequence[WorkloadRequest], record: bool = False
) -> SimResult:
    """Run every request of the workload to completion (or rejection); deterministic for a fixed input."""
    ecfg = EngineConfig(
        max_model_len=cluster.max_model_len,
        num_instances=cluster.num_instances,
        kv_tokens_per_instance=cluster.kv_tokens_per_instance,
        page_size=cluster.page_size,
        max_num_seqs=cluster.max_num_seqs,
        max_prefill_tokens=cluster.max_model_len,
        aligned_groups=False,
        enable_prefix_caching=cluster.prefix_caching,
        host_prefetch=cluster.host_prefetch,
        decode_steps=1,  # the paper's iteration: the scheduler decides after every decode step
    )
    if cluster.prefix_caching and not all(w.hash_ids for w in workload):
        raise ValueError("prefix caching in the simulator needs a workload with hash ids (the Mooncake trace)")
    ex = SimExecutor(cluster.timing, cluster.page_size)
    engine = Engine(tiny_config(), ecfg, ex, seed=0, policy=policy)
    if cluster.prefix_caching and cluster.host_tier_tokens:
        pages = cluster.host_tier_tokens // cluster.page_size if math.isfinite(cluster.host_tier_tokens) else 1 << 62
        for part in np.array_split(np.arange(cluster.num_instances), cluster.host_tiers):
            engine.use_host_tier(HostTier(int(pages)), part.tolist())
    timeline = engine.record_timeline(limit=10_000_000) if record else None
    order = sorted(range(len(workload)), key=lambda k: workload[k].arrival)
    records = [RequestRecord(w.arrival, w.input_len, w.output_len) for w in workload]
    live = {}
    i = 0
    while i < len(order) or engine.has_unfinished():
        now = ex.now()
        while i < len(order) and workload[order[i]].arrival <= now:
            k = order[i]
            w, rec = workload[k], records[k]
            i += 1
            limit, need = cluster.max_request_tokens, w.input_len + w.output_len
            if limit is not None and need > limit:
                rec.rejected = f"needs {need} tokens of KV; one instance of this system holds {limit}"
                continue
            params = SamplingParams(max_tokens=w.output_len, ignore_eos=True, temperature=0.0)
            try:
                req = engine.add_request(prompt_ids(w, engine.cfg.vocab_size), params)
            except RequestRejected as e:
                rec.rejected = str(e)
                continue
            req.arrival = w.arrival
            live[req.rid] = (req, rec)
        nxt = workload[order[i]].arrival if i < len(order) else None
        touched = engine.step(None if nxt is None else max(0.0, nxt - now))
        for req in touched:
            if req.finished:
                _, rec = live.pop(req.rid)
                rec.first_token, rec.finish, rec.preemptions = req.first_token_time, req.finish_time, req.preemptions
                if req.finish_reason == "error":
                    rec.rejected = "the policy could not place it even on an idle cluster"
        if not engine.launches and not touched and ex.now() == now:  # nothing ran, nothing is running
            if nxt is not None:
                ex.advance(nxt)
            elif engine.has_unfinished():
                raise SimulationStalled(f"{len(engine.waiting)} waiting and {len(engine.running)} running can't run")
    s = engine.stats
    stats = {
        "prefills": s.prefills,
        "decode_launches": s.decode_launches,
        "scale_downs": s.scale_downs,
        "scale_ups": s.scale_ups,
        "migrations": s.migrations,
        "preemptions": s.preemptions,
        "mean_prefill_degree": _mean_degree(s.prefill_degrees),
        "mean_decode_degree": _mean_degree(s.decode_degrees),
        "kv_left": engine.kv_used_tokens,
        "prefix_query_tokens": engine.prefix_cache.stats.query_tokens,
        "prefix_hit_tokens": engine.prefix_cache.stats.hit_tokens,
        "prefix_evictions": engine.prefix_cache.evictions,
        "host_hit_tokens": sum(t.stats.hit_tokens for t in engine.prefix_cache.host_tiers()),
        "host_prefetched_tokens": sum(t.stats.prefetched_pages for t in engine.prefix_cache.host_tiers())
        * cluster.page_size,
        "host_evictions": sum(t.stats.evictions for t in engine.prefix_cache.host_tiers()),
    }
    return SimResult(records, list(timeline.spans) if timeline else [], stats, ex.now())


def _mean_degree(counts: dict[int, int]) -> float:
    """Mean group degree from a degree -> count table."""
    total = sum(counts.values())
    return sum(d * c for d, c in counts.items()) / total if total else 0.0
