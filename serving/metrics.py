"""Prometheus metrics under the `loong:` prefix: the usual serving metrics plus the elastic ones."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from loong_jax.engine import Engine
from loong_jax.prefix import HostTierStats
from loong_jax.runtime.memory import KVCapacity
from loong_jax.runtime.request import Request

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DEGREES = (1, 2, 4, 8, 16, 32, 64)
_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Updated by the engine thread after every iteration; rendered by GET /metrics."""

    def __init__(self, num_instances: int, capacity: KVCapacity | None = None):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("loong:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY, registry=r)
        self.itl = Histogram(
            "loong:inter_token_latency_seconds", "Time between consecutive output tokens.", buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram("loong:e2e_request_latency_seconds", "End-to-end latency.", buckets=_LATENCY, registry=r)
        self.queue = Histogram(
            "loong:request_queue_time_seconds",
            "Time from arrival to the start of prefill.",
            buckets=_LATENCY,
            registry=r,
        )
        self.running = Gauge("loong:num_requests_running", "Requests being prefilled or decoded.", registry=r)
        self.waiting = Gauge("loong:num_requests_waiting", "Requests waiting for admission.", registry=r)
        self.kv_usage = Gauge("loong:kv_cache_usage_perc", "Fraction of the distributed KV pool in use.", registry=r)
        self.kv_instance = Gauge(
            "loong:kv_cache_usage_perc_instance", "Fraction of one instance's KV pool in use.", ["instance"], registry=r
        )
        self.prompt_tokens = Counter("loong:prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("loong:generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("loong:request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.preemptions = Counter("loong:num_preemptions", "Requests preempted (recomputed later).", registry=r)
        self.prefill_degree = Histogram(
            "loong:prefill_group_degree", "Instances in each prefill group.", buckets=_DEGREES, registry=r
        )
        self.decode_degree = Histogram(
            "loong:decode_group_degree", "Instances in each decode group.", buckets=_DEGREES, registry=r
        )
        self.decode_batch = Histogram(
            "loong:decode_batch_size", "Requests in each decode launch.", buckets=_BATCHES, registry=r
        )
        self.scale_ups = Counter("loong:scale_ups", "Decode launches giving a request a new master.", registry=r)
        self.scale_downs = Counter("loong:scale_downs", "Prefills keeping KV on fewer instances.", registry=r)
        self.migrations = Counter("loong:migrations", "KV migrations between instances.", registry=r)
        self.decode_launches = Counter(
            "loong:decode_launches", "Decode launches (bursts of one or several steps).", registry=r
        )
        self.chained_launches = Counter(
            "loong:decode_launches_chained",
            "Decode bursts dispatched before the burst they continue was read.",
            registry=r,
        )
        self._stat_counters = {  # EngineStats field -> its counter
            "scale_ups": self.scale_ups,
            "scale_downs": self.scale_downs,
            "migrations": self.migrations,
            "preemptions": self.preemptions,
            "decode_launches": self.decode_launches,
            "chained_launches": self.chained_launches,
        }
        self.cache_counters = {  # prefix cache: counter -> where the engine counts it
            Counter("loong:prefix_cache_queries", "Prefills that looked for a cached prefix.", registry=r): (
                lambda e: e.prefix_cache.stats.queries
            ),
            Counter("loong:prefix_cache_query_tokens", "Prompt tokens of those prefills.", registry=r): (
                lambda e: e.prefix_cache.stats.query_tokens
            ),
            Counter("loong:prefix_cache_hits", "Prefills that found a cached prefix.", registry=r): (
                lambda e: e.prefix_cache.stats.hits
            ),
            Counter("loong:prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", registry=r): (
                lambda e: e.prefix_cache.stats.hit_tokens
            ),
            Counter("loong:prefix_cache_evictions", "Cached pages evicted to make room.", registry=r): (
                lambda e: e.prefix_cache.evictions
            ),
            Counter("loong:prefix_cache_published_pages", "Pages cached under a new prefix key.", registry=r): (
                lambda e: sum(p.published for p in e.pools)
            ),
        }
        for name, field, doc in (  # the host tier's (zero without one)
            ("hits", "hits", "Prefills that loaded prefix pages from the host tier."),
            ("hit_tokens", "hit_tokens", "Prompt tokens loaded from the host tier instead of computed."),
            ("loaded_bytes", "loaded_bytes", "K/V bytes loaded from the host tier into KV pools."),
            ("stored_bytes", "stored_bytes", "K/V bytes of evicted pages stored in the host tier."),
            ("evictions", "evictions", "Pages dropped from the host tier to make room."),
            ("load_seconds", "load_seconds", "Seconds from each load's dispatch until its pages were in the pool."),
            ("save_seconds", "save_host_seconds", "Engine-loop seconds spent dispatching saves to the host tier."),
            ("load_dispatch_seconds", "load_host_seconds", "Engine-loop seconds spent dispatching loads from it."),
            ("prefetched_pages", "prefetched_pages", "Pages loaded from the host tier for waiting requests."),
            ("failed_loads", "failed_loads", "Loads from the host tier that failed (those pages were computed)."),
        ):
            counter = Counter(f"loong:prefix_cache_host_{name}", doc, registry=r)
            self.cache_counters[counter] = lambda e, f=field: getattr(_tier_stats(e), f)
        self._cache_seen = dict.fromkeys(self.cache_counters, 0)
        self.cache_pages = Gauge(
            "loong:prefix_cache_pages_instance",
            "Cached prefix pages in one instance's KV pool.",
            ["instance"],
            registry=r,
        )
        self.host_pages = Gauge("loong:prefix_cache_host_pages", "Pages in the host tiers.", registry=r)
        self.host_capacity = Gauge(
            "loong:prefix_cache_host_capacity_bytes", "Size of the host tiers (0: none).", registry=r
        )
        self.iteration = Histogram("loong:iteration_seconds", "Engine iteration time.", buckets=_LATENCY, registry=r)
        for i in range(num_instances):
            self.kv_instance.labels(instance=str(i)).set(0)
            self.cache_pages.labels(instance=str(i)).set(0)
        if capacity is not None:
            self._capacity(capacity)
        self._seen = dict.fromkeys(self._stat_counters, 0)
        self._prefill_seen: dict[int, int] = {}  # degree -> prefills already observed
        self._decode_seen: dict[int, int] = {}
        self._batch_seen: dict[int, int] = {}
        self._last_token: dict[int, tuple[int, float]] = {}

    def _capacity(self, c: KVCapacity) -> None:
        """The KV pool size chosen at start-up and how it was derived (constant for the server's life)."""
        r = self.registry
        Gauge("loong:kv_cache_tokens_per_instance", "KV cache tokens per instance.", registry=r).set(
            c.tokens_per_instance
        )
        Gauge("loong:kv_cache_capacity_tokens", "KV cache tokens of all instances.", registry=r).set(c.total_tokens)
        Gauge("loong:kv_cache_capacity_bytes", "KV cache bytes of all instances.", registry=r).set(
            c.bytes_per_instance * c.num_instances
        )
        Info("loong:kv_cache_sizing", "How the KV cache size was chosen.", registry=r).info(
            {
                "how": c.how,
                "memory_utilization": f"{c.utilization:g}",
                "memory": c.domain,
                "budget_bytes": str(c.budget_bytes),
                "in_use_bytes": str(c.in_use_bytes),
                "weight_bytes": str(c.weight_bytes),
                "temp_bytes": str(c.temp_bytes),
            }
        )

    def on_iteration(self, engine: Engine, touched: Sequence[Request], seconds: float | None) -> None:
        """After an engine iteration of `seconds` (None: requests aborted between iterations)."""
        now = time.monotonic()
        if seconds is not None:
            self.iteration.observe(seconds)
        s = engine.stats
        for hist, counts, seen in (
            (self.prefill_degree, s.prefill_degrees, self._prefill_seen),
            (self.decode_degree, s.decode_degrees, self._decode_seen),
            (self.decode_batch, s.decode_batches, self._batch_seen),
        ):
            for degree, count in counts.items():
                for _ in range(count - seen.get(degree, 0)):
                    hist.observe(degree)
                seen[degree] = count
        for name, counter in self._stat_counters.items():
            counter.inc(getattr(s, name) - self._seen[name])
            self._seen[name] = getattr(s, name)
        for req in touched:
            n = len(req.output_ids)
            before = self._last_token.get(req.rid)
            if req.finish_reason == "abort" and before is None:  # aborted before any token was counted
                self.finished.labels(finished_reason="abort").inc()
                continue
            if before is None:
                self.prompt_tokens.inc(len(req.prompt_ids))
                if req.first_token_time is not None:
                    self.ttft.observe(req.first_token_time - req.arrival)
                if req.scheduled_time is not None:
                    self.queue.observe(req.scheduled_time - req.arrival)
            elif n > before[0]:
                self.itl.observe((now - before[1]) / (n - before[0]))
            self.generation_tokens.inc(n - (before[0] if before else 0))
            self._last_token[req.rid] = (n, now)
            if req.finished:
                self._last_token.pop(req.rid, None)
                self.finished.labels(finished_reason=req.finish_reason or "unknown").inc()
                if req.finish_reason != "abort":
                    self.e2e.observe((req.finish_time or now) - req.arrival)
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        total = sum(p.num_slots for p in engine.pools)
        self.kv_usage.set(engine.kv_used_tokens / total)
        for i, pool in enumerate(engine.pools):
            self.kv_instance.labels(instance=str(i)).set(pool.used_tokens / pool.num_slots)
            self.cache_pages.labels(instance=str(i)).set(len(pool.cached))
        tiers = engine.prefix_cache.host_tiers()  # one per process
        self.host_pages.set(sum(t.pages for t in tiers))
        self.host_capacity.set(sum(t.capacity_bytes for t in tiers))
        for counter, count in self.cache_counters.items():
            value = count(engine)
            counter.inc(value - self._cache_seen[counter])
            self._cache_seen[counter] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _tier_stats(engine: Engine) -> HostTierStats:
    """The host tiers' counters summed (a multi-host engine has one tier per process)."""
    tiers = engine.prefix_cache.host_tiers()
    fields = dataclasses.fields(HostTierStats)
    return HostTierStats(**{f.name: sum(getattr(t.stats, f.name) for t in tiers) for f in fields})
