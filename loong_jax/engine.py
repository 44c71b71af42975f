"""The engine loop: admits requests, keeps group programs in flight on disjoint instances, streams tokens.

Host-side state lives here: the queues, the requests, and one page pool per instance (together the
unified distributed KV pool: any token of any request may live on any instance). Each step the engine
applies the tokens of every finished launch, asks the policy what the free instances should run, and
launches that without waiting: a long prefill on some instances never holds up decode steps on others.
The executor is the JAX one or the simulated one; the loop is the same. Admission is memory-safe: a
request's prompt plus its maximum number of new tokens is reserved in the whole pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import math
import secrets
import statistics
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints.tokenizer import IncrementalDetokenizer, Tokenizer
from loong_jax.model.config import ModelConfig
from loong_jax.model.sampling import VARIANTS, SamplerFlags, SamplerOutputs, SamplingParams
from loong_jax.multihost.channel import PlanChannel
from loong_jax.multihost.leader import Leader
from loong_jax.prefix import HostTier, PrefixCache
from loong_jax.runtime.batching import bucket, prefill_rows
from loong_jax.runtime.host_store import PageStore
from loong_jax.runtime.instances import Group
from loong_jax.runtime.jax_executor import MAX_MIGRATE_TOKENS, JaxExecutor
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.memory import (
    PROGRAM_HOST_BYTES,
    KVCapacity,
    host_available_bytes,
    memory_map_room,
    probe_domains,
    program_limit,
    size_host_tier,
    size_kv_pools,
)
from loong_jax.runtime.request import Request, Status, queue_order
from loong_jax.runtime.timeline import Span, Timeline
from loong_jax.runtime.work import DecodeWork, Executor, FatalError, Iteration, Launch, Migration, PrefillWork
from loong_jax.scheduling.cost_model import CostModel, rough_cost_model
from loong_jax.scheduling.elastic import ElasticScheduler, SchedulerConfig
from loong_jax.scheduling.policy import Policy, SchedulerView, SharedComputePolicy, pages_to_reserve
from loong_jax.structured import GrammarCompiler
from pallas_kernels import BACKENDS

log = logging.getLogger("loong_jax")
EXTRA_PROGRAMS = 64  # compiled programs kept beyond the warm set (sampler variants, other shapes)
PREFETCH_AHEAD = 4  # waiting requests, next in line, whose prefixes are loaded from the host tier early


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long, larger than the whole KV pool, ...)."""


MAX_DECODE_STEPS = 64


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacities and batching limits of the engine."""

    max_model_len: int
    num_instances: int = 1
    tp: int = 1
    kv_tokens_per_instance: int | None = None  # None: size the pools from memory (build_engine does)
    memory_utilization: float | None = None  # fraction of the memory to fill; None: 0.9 accelerators, 0.5 CPU
    page_size: int = 16
    max_num_seqs: int = 32
    max_batch_requests: int | None = None  # requests one scheduling decision admits (None: one prefill pass each)
    decode_steps: int = 8  # most decode steps per launch (a burst: tokens fed back on the device; see burst_steps)
    max_burst_s: float = 0.25  # bursts that would last longer (at the decode speed seen) run as single steps
    max_prefill_tokens: int | None = None  # tokens of one prefill pass (longer prompts: chunks); None: max_model_len
    min_prefill_bucket: int = 16
    output_estimate: int = 256  # new tokens admission plans for when a request gives no max_tokens
    aligned_groups: bool = True
    policy: str = "elastic"  # "elastic": the cost-model scheduler; "shared": instances share one processor
    attention_backend: str = "auto"  # "auto" (Pallas on GPU, XLA elsewhere), "xla" or "pallas"
    enable_prefix_caching: bool = True  # reuse the K/V of full pages of earlier requests' prefixes
    host_kv_cache_gib: float | None = None  # prefix pages evicted from the pools kept in host memory (0: off)
    host_prefetch: bool = False  # load waiting requests' prefixes from the host tier ahead of their prefills
    # (off by default until the whole suite runs with it on; see docs/prefix-caching.md)
    unroll_layers: bool | None = None  # layers unrolled, weights read in place (None: on accelerators, not on CPU)
    heartbeat_timeout_s: float = 30.0  # multi-host: a follower silent this long is lost
    step_timeout_s: float = 300.0  # multi-host: a follower that has not answered a launch by then is lost

    POLICIES = ("elastic", "shared")

    def __post_init__(self) -> None:
        if self.policy not in self.POLICIES:
            raise ValueError(f"policy must be one of {', '.join(self.POLICIES)}, got {self.policy!r}")
        if self.kv_tokens_per_instance is not None and self.kv_tokens_per_instance < self.page_size:
            raise ValueError(
                f"kv_tokens_per_instance must be >= page_size ({self.page_size}), got {self.kv_tokens_per_instance}"
            )
        if self.host_kv_cache_gib is not None and not self.host_kv_cache_gib >= 0:
            raise ValueError(
                f"host_kv_cache_gib must be >= 0 (0 turns the host tier off), got {self.host_kv_cache_gib}"
            )
        if self.memory_utilization is not None and not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.max_prefill_tokens is None:
            object.__setattr__(self, "max_prefill_tokens", self.max_model_len)
        if self.output_estimate < 1:
            raise ValueError(f"output_estimate must be >= 1, got {self.output_estimate}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {self.attention_backend!r}")
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_num_seqs and max_prefill_tokens must be >= 1")
        if self.max_batch_requests is not None and self.max_batch_requests < 1:
            raise ValueError(
                "max_batch_requests must be >= 1 (or None: one prefill pass per instance), "
                f"got {self.max_batch_requests}"
            )
        if not 1 <= self.decode_steps <= MAX_DECODE_STEPS:
            raise ValueError(f"decode_steps must be in [1, {MAX_DECODE_STEPS}], got {self.decode_steps}")
        if not self.max_burst_s > 0:
            raise ValueError(f"max_burst_s must be > 0 seconds, got {self.max_burst_s}")
        if self.num_instances < 1 or self.tp < 1:
            raise ValueError(f"num_instances and tp must be >= 1, got {self.num_instances}, {self.tp}")
        if not (self.heartbeat_timeout_s > 0 and self.step_timeout_s > 0):
            raise ValueError(
                "heartbeat_timeout_s and step_timeout_s must be > 0, "
                f"got {self.heartbeat_timeout_s} and {self.step_timeout_s}"
            )

    @property
    def num_pages(self) -> int:
        if self.kv_tokens_per_instance is None:
            raise ValueError("the KV pool size is not known yet (build_engine sizes it from memory)")
        return self.kv_tokens_per_instance // self.page_size

    @property
    def prefill_span(self) -> int:
        """Most instances one prompt's prefill may use (its KV must fit there): the shared policy prefills on
        one instance, the elastic one on up to the largest (aligned power-of-two) group."""
        if self.policy == "shared":
            return 1
        return 1 << (self.num_instances.bit_length() - 1) if self.aligned_groups else self.num_instances

    def check_fits_one_request(self) -> None:
        """ValueError unless the pools can hold one request of max_model_len tokens under the policy."""
        span, tokens = self.prefill_span, self.kv_tokens_per_instance or 0
        if (tokens // self.page_size - 1) * self.page_size * span >= self.max_model_len:
            return
        longest = max(0, (tokens // self.page_size - 1) * self.page_size * span)
        raise ValueError(
            f"a KV cache of {tokens:,} tokens per instance cannot hold one request of max_model_len="
            f"{self.max_model_len:,} tokens: the {self.policy} policy keeps a prompt on at most {span} instance(s), "
            f"which hold requests of up to {longest:,} tokens. Lower max_model_len (to at most {longest:,}) or "
            "give the KV cache more room (kv_tokens_per_instance, memory_utilization)."
        )

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


@dataclasses.dataclass
class EngineStats:
    """Counters of what only an elastic engine does (exported as metrics)."""

    prefills: int = 0
    decode_launches: int = 0  # decode bursts (each of one or several steps)
    decode_tokens: int = 0  # tokens sampled by decode launches
    chained_launches: int = 0  # decode bursts dispatched before the burst they continue was read
    scale_downs: int = 0  # prefills whose KV was kept on fewer instances than ran them
    scale_ups: int = 0  # decode steps in which a request got a master that held none of its KV
    migrations: int = 0
    preemptions: int = 0
    failed_launches: int = 0  # programs that failed to start or to finish (their requests failed)
    prefill_degrees: Counter[int] = dataclasses.field(default_factory=Counter)  # degree -> prefills (bounded)
    decode_degrees: Counter[int] = dataclasses.field(default_factory=Counter)  # degree -> decode launches
    decode_batches: Counter[int] = dataclasses.field(default_factory=Counter)  # requests -> decode launches

    def count_degree(self, kind: str, degree: int) -> None:
        (self.prefill_degrees if kind == "prefill" else self.decode_degrees)[degree] += 1


class Engine:
    """Host-side state (queues, per-instance page pools, requests, launches in flight) around an executor."""

    def __init__(
        self,
        cfg: ModelConfig,
        ecfg: EngineConfig,
        executor: Executor,
        tokenizer: Tokenizer | None = None,
        seed: int | None = None,
        policy: Policy | None = None,
    ):
        self.cfg = cfg
        self.ecfg = ecfg
        self.tokenizer = tokenizer
        self.executor = executor
        self.pools = [PagePool(ecfg.num_pages, ecfg.page_size) for _ in range(ecfg.num_instances)]
        salt = hashlib.blake2b(repr(cfg).encode(), digest_size=16).digest()  # keys of one model only
        self.prefix_cache = PrefixCache(self.pools, salt, enabled=ecfg.enable_prefix_caching)
        self.policy: Policy = policy or self.default_policy(rough_cost_model())
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.launches: list[Launch] = []  # programs in flight, oldest first
        self._changed = True  # queues or instances changed since the policy last decided
        self.stats = EngineStats()
        self.timeline: Timeline | None = None  # every launch's span, once record_timeline() is called
        self.kv_capacity: KVCapacity | None = None  # how the pools were sized (set by build_engine)
        self._failed: list[Request] = []  # requests failed since the last step returned (to publish)
        self._ids = itertools.count()
        self._reserved_pages = 0
        self._prefetched: set[int] = set()  # waiting requests whose prefixes were prefetched (or had nothing to)
        self._step_times: deque[float] = deque(maxlen=5)  # seconds a decode step took
        self._rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
        eos = tokenizer.eos_token_ids if tokenizer is not None else cfg.eos_token_ids
        self.eos_ids = tuple(eos or cfg.eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, cfg.vocab_size, self.eos_ids)  # structured outputs

    def use_host_tier(self, tier: HostTier, instances: Sequence[int] | None = None) -> None:
        """Keep the pages these instances' pools (all by default) evict in a host tier, loaded back on a
        prefix hit (the executor saves and loads pages: `save_pages`, `load_pages`, `before_write`)."""
        ex = self.executor
        self.prefix_cache.use_host_tier(tier, instances)
        ex.before_write = lambda group: self.prefix_cache.spill(group, ex.save_pages)

    def _load(self, loads: dict[int, tuple[list[int], list[int]]]) -> None:
        """Dispatch loads of host tier slots into pages of instances' pools ({instance: (pages, slots)}, one
        tier's); their time is counted once done."""
        tier, started = self.prefix_cache.tiers[next(iter(loads))], time.perf_counter()

        def done() -> None:
            tier.stats.load_seconds += time.perf_counter() - started

        loading = self.executor.load_pages(loads)
        tier.stats.load_host_seconds += time.perf_counter() - started
        self.executor.when_ready(loading, done)

    def _pays(self, degree: int, new: int, held: int, reload: int) -> bool:
        """Whether the policy's cost model predicts loading K/V from the host tier beats computing it (yes
        without a cost model)."""
        cost = getattr(self.policy, "cost", None)
        return cost is None or cost.reload_pays(degree, new, held, reload)

    def _after_failed_loads(self, work: PrefillWork) -> None:
        """Instances where a host-tier load failed: those whose pool it left unusable get empty ones, and the
        requests holding K/V there (this prefill's too) are recomputed later."""
        self._repair_failed_loads()
        keep = [k for k, r in enumerate(work.requests) if r.status is Status.RUNNING]
        work.requests = [work.requests[k] for k in keep]
        work.plans = [work.plans[k] for k in keep]
        if work.chunk is not None:
            work.chunk = [work.chunk[k] for k in keep]

    def _repair_failed_loads(self) -> None:
        failed, self.prefix_cache.failed_loads = self.prefix_cache.failed_loads, []
        for i in self.executor.repair(tuple(sorted(set(failed)))):
            for req in [r for r in self.running if self.pools[i].tokens.get(r.rid, 0)]:
                self._preempt(req)
            self.prefix_cache.flush([i])

    def _prefetch(self) -> None:
        """Load the host-tier pages of the prefixes of the next waiting requests into unused pages of
        instances whose programs are all dispatched, beside what they compute, so that those requests'
        prefills find them on the devices instead of loading them first."""
        cache = self.prefix_cache
        if not self.ecfg.host_prefetch or not self.waiting or not cache.host_tiers():
            return
        ready = [i for i in range(self.ecfg.num_instances) if self.executor.can_load(i)]
        if not ready:
            return
        ahead = heapq.nsmallest(PREFETCH_AHEAD, self.waiting, key=queue_order)
        for req in ahead:
            # each is looked up once while it is next in line; a preempted request is not (its prefix's pages
            # would take the room it was preempted to free: the two would alternate for ever)
            if req.rid not in self._prefetched and not req.preemptions:
                cache.prefetch(req, ready, self._load, self._pays)
        self._prefetched = {req.rid for req in ahead}
        if cache.failed_loads:
            self._repair_failed_loads()

    # ----- requests -------------------------------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0) -> Request:
        """Validate and queue a request; raises RequestRejected with the limit and the value given."""
        prompt_ids = [int(t) for t in prompt_ids]
        n, limit = len(prompt_ids), self.ecfg.max_model_len
        if n == 0:
            raise RequestRejected("the prompt is empty; give at least one token")
        vocab = self.cfg.vocab_size
        for name, ids in (
            ("prompt token ids", prompt_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias token ids", list(params.logit_bias or ())),
        ):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestRejected(f"{name} must be in [0, {vocab}), got {bad[:5]}")
        max_new = params.max_tokens if params.max_tokens is not None else limit - n
        if params.max_tokens is None and n >= limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens, but the prompt has {n}: a prompt may have "
                f"at most {limit - 1}, to leave room for at least one new token. Please shorten the prompt."
            )
        if n + max(max_new, 1) > limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + max(max_new, 0)} tokens ({n} in the prompt, {max(max_new, 0)} in the completion). "
                "Please reduce the length of the prompt or the completion."
            )
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63 - 1))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        req = Request(next(self._ids), prompt_ids, params, max_new, seed, self.eos_ids, detok)
        if params.structured_output is not None:  # compiled already if the caller called grammars.check first
            try:
                req.matcher = self.grammars.matcher(params.structured_output)
            except ValueError as e:
                raise RequestRejected(str(e)) from None
        req.arrival, req.priority = self.executor.now(), int(priority)
        # Without max_tokens, plan for a typical output (preemption by recomputation covers longer ones)
        # rather than reserve the whole rest of the context for every request.
        req.expected_new_tokens = max_new if params.max_tokens is not None else min(max_new, self.ecfg.output_estimate)
        longest = self.max_prompt_tokens
        if longest is not None and req.num_prefill_tokens > longest:
            raise RequestRejected(
                f"the prompt has {n} tokens, but this engine's {self.ecfg.policy} scheduling can keep the K/V of "
                f"at most {longest} prompt tokens ({self.pools[0].num_slots} KV tokens per instance); shorten "
                "the prompt"
            )
        if pages_to_reserve(req, self.pools) > sum(p.num_pages for p in self.pools):
            capacity = sum(p.num_slots for p in self.pools)
            raise RequestRejected(
                f"the request needs {n + max_new} tokens of KV cache but the whole pool holds "
                f"{capacity}; reduce the prompt or max_tokens"
            )
        self.requests[req.rid] = req
        self.waiting.append(req)
        self._changed = True
        return req

    def abort(self, rid: int) -> None:
        """Stop a request at any point and free its KV (a program still computing it is ignored)."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, "abort"
        self._changed = True
        req.finish_time = self.executor.now()
        self._retire(req)

    def fail(self, rid: int, message: str) -> None:
        """End a request with an error at any point (its KV is freed; a program computing it is ignored)."""
        req = self.requests.get(rid)
        if req is not None and not req.finished:
            self._fail(req, message)

    @property
    def max_prompt_tokens(self) -> int | None:
        """The longest prompt the policy can ever prefill here (None: the policy sets no such limit)."""
        limit = getattr(self.policy, "max_prompt_tokens", None)
        return None if limit is None else limit(self.pools[0].num_pages, self.ecfg.page_size)

    def default_policy(self, cost: CostModel) -> Policy:
        """The configured policy for this engine's instances: the elastic scheduler priced by `cost`, or
        the one-program-at-a-time policy for instances that share one processor."""
        if self.ecfg.policy == "shared":
            return SharedComputePolicy(self.ecfg.num_instances)
        ecfg = self.ecfg
        config = SchedulerConfig(aligned_groups=ecfg.aligned_groups, max_batch_requests=ecfg.max_batch_requests)
        return ElasticScheduler(self.ecfg.num_instances, cost, config)

    def record_timeline(self, limit: int = 200_000) -> Timeline:
        """Record a span for every launch from now on (the last `limit` are kept) and return the timeline."""
        self.timeline = Timeline(limit)
        return self.timeline

    def _record(self, launch: Launch, **details: object) -> None:
        """The launch's span on the timeline, if one is recorded."""
        if self.timeline is not None:
            span = Span(launch.kind, tuple(launch.group), self.executor.now(), requests=len(launch.requests))
            launch.span = self.timeline.add(dataclasses.replace(span, **details))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.launches)

    @property
    def kv_used_tokens(self) -> int:
        return sum(p.used_tokens for p in self.pools)

    def holders(self, rid: int) -> dict[int, int]:
        """Instance -> tokens of request rid's KV held there."""
        return {i: p.tokens[rid] for i, p in enumerate(self.pools) if p.tokens.get(rid, 0)}

    @property
    def busy(self) -> set[int]:
        """Instances running a launch."""
        return {i for x in self.launches for i in x.group}

    # ----- the loop -------------------------------------------------------------------------------

    def _view(self) -> SchedulerView:
        busy = self.busy
        in_flight = {r.rid for x in self.launches for r in x.requests}
        free = [r for r in self.running if r.rid not in in_flight and not busy.intersection(self.holders(r.rid))]
        decoding = [r for r in free if r.prefill_done]
        prefilling = [r for r in free if not r.prefill_done]
        return SchedulerView(
            self.waiting,
            decoding,
            self.pools,
            self.ecfg.max_num_seqs,
            self.ecfg.max_prefill_tokens,
            self._reserved_pages,
            self.ecfg.min_prefill_bucket,
            busy=frozenset(busy),
            num_running=len(self.running),
            now=self.executor.now(),
            prefilling=prefilling,
            running=tuple(self.running),
            stepping=[(x.group, x.requests) for x in self.launches if x.kind == "decode"],
            decode_steps=self._burst_limit(),
            cached=self.prefix_cache.locator() if self.prefix_cache.enabled else None,
            reloadable=self.prefix_cache.host_run if self.prefix_cache.host_tiers() else None,
        )

    def _burst_limit(self) -> int:
        """decode_steps, unless a burst of it would last longer than max_burst_s at the speed decode steps
        have run lately, or no step has been timed yet: then single steps (a prompt arriving waits for the
        bursts in flight, and a stream's tokens come a burst at a time, so their length bounds what they add
        to a time to first token and to the gaps between tokens; where a step is that slow the host's share
        of it, which bursts save, is small anyway)."""
        k, recent = self.ecfg.decode_steps, self._step_times
        return k if recent and statistics.median(recent) * k <= self.ecfg.max_burst_s else 1

    def step(self, timeout: float | None = None) -> list[Request]:
        """One turn of the loop: apply finished launches, launch what the policy puts on free instances.

        Waits (up to `timeout`, forever if None) only when nothing new could be launched and something
        is in flight. Returns the requests that received tokens or finished.
        """
        touched = self._collect()
        self.executor.poll_host()  # file the evicted pages whose copy to the host has arrived
        launched = 0
        if self._changed:  # otherwise the policy would see what it saw last time
            self._changed = False
            launched = self.launch(self.policy.schedule(self._view()))
            self._prefetch()
            touched += self._take_failed()
        launched += self._chain()
        if not launched and not touched and self.launches:
            self.executor.wait(self.launches, timeout)
            touched = self._collect()
        elif not launched and not self.launches and self.waiting and not self.running and not self._changed:
            touched.append(self._reject_blocker())  # an idle engine that cannot start it never will
        elif not launched and not self.launches and self.running and not self._changed:
            self._unblock()
        return touched

    def _unblock(self) -> None:
        """Running requests, nothing in flight and nothing the policy can start: the pools are too full for
        any of them to go on. The one that started last is recomputed later, so that the others can."""
        req = max(self.running, key=lambda r: (r.scheduled_time or 0.0, r.rid))
        log.warning("no running request can go on in the memory left; recomputing request %d later", req.rid)
        self._preempt(req)

    def _chain(self) -> int:
        """Dispatch the next burst of each decode group the scheduler would leave as it is, before the
        running burst's tokens are read: the host then reads, streams and schedules one burst while the
        device runs the next. Only where there is nothing to decide: no request waiting or failed, nothing
        but decode bursts in flight, every running request in one, every request of the burst with tokens
        left to sample and room at its master for a whole burst (else the scheduler scales up). At most
        two bursts of a group are in flight; a prompt arriving meanwhile waits for both. Returns how many."""
        tails = [  # bursts in flight that nothing continues yet, and whose predecessor was read
            x
            for x in self.launches
            if x.work is not None
            and x.work.steps > 1
            and x.successor is None
            and (x.follows is None or x.follows.collected)
            and getattr(x.pending, "carry", None) is not None
        ]
        if not tails or self.waiting or self._failed or not all(x.kind == "decode" for x in self.launches):
            return 0
        stepping = {r.rid for x in self.launches for r in x.requests}
        if any(r.rid not in stepping for r in self.running):
            return 0
        chained = 0
        for launch in tails:
            work = launch.work
            if not self.executor.can_chain(work.group):
                continue
            budgets = [r.max_new_tokens - len(r.output_ids) - launch.reserved[r.rid] for r in work.requests]
            masters = [self.pools[work.group[m]] for m in work.masters]
            if any(r.finished for r in work.requests) or any(
                b < 1 or pool.room(r.rid) < min(b, work.steps) for r, b, pool in zip(work.requests, budgets, masters)
            ):
                continue
            try:
                nxt = self.executor.decode(work, [self.pools[i] for i in work.group], after=launch)
            except Exception as e:
                self._launch_failed("decode", work.group, work.requests, e)
                continue
            launch.successor, nxt.started = nxt, self.executor.now()
            self.launches.append(nxt)
            self.stats.chained_launches += 1
            self._count_decode(work, [])
            self._record(nxt, tokens=len(work.requests))
            chained += 1
        return chained

    def _take_failed(self) -> list[Request]:
        failed, self._failed = self._failed, []
        return failed

    def _reject_blocker(self) -> Request:
        """The request the policy would start first on an idle engine but could not: it is the one refused
        (admission should have refused it already; this is the safety net)."""
        req = min(self.waiting, key=queue_order)
        n = req.num_prefill_tokens
        log.error("request %d (%d tokens) cannot be scheduled on an idle engine; rejecting it", req.rid, n)
        self._fail(req, f"the engine cannot place this request ({n} prompt tokens) on its instances")
        self._failed.remove(req)
        return req

    def execute(self, it: Iteration) -> list[Request]:
        """Run a hand-built iteration to completion (tests use it): launch everything, wait for all."""
        self.launch(it)
        touched = []
        while self.launches:
            self.executor.wait(self.launches, None)
            touched += self._collect()
        return touched

    def launch(self, it: Iteration) -> int:
        """Start every migration, prefill and decode of an iteration; returns how many were launched.

        A launch that fails to start fails only its own requests (see `_launch_failed`); the others start."""
        busy = self.busy
        if busy.intersection(it.instances()):
            raise ValueError(f"instances {sorted(busy.intersection(it.instances()))} are running a program")
        for req in it.preempt:
            self._preempt(req)
        # the next-token masks of every structured output this iteration samples, computed together
        self.grammars.prepare([r.matcher for w in (*it.prefills, *it.decodes) for r in w.requests if r.matcher])
        pairs: dict[tuple[int, int], list[Migration]] = {}
        for move in it.migrations:
            pairs.setdefault((move.src, move.dst), []).append(move)
        launched = 0
        for (src, dst), moves in pairs.items():
            try:
                launch = self._migrate(src, dst, moves)
                self.launches.append(launch)
                launched += 1
                self._record(launch, tokens=sum(m.tokens for m in moves))
            except Exception as e:  # the moved requests are recomputed: nothing is lost
                self._launch_failed("migration", (src, dst), [], e)
                for move in moves:
                    req = self.requests.get(move.rid)
                    if req is not None and req.status is Status.RUNNING:
                        self._preempt(req)
        now = self.executor.now()
        for work in it.prefills:
            fresh = [req for req in work.requests if req.status is Status.WAITING]
            for req in fresh:
                self.waiting.remove(req)
                req.status = Status.RUNNING
                req.scheduled_time = now if req.scheduled_time is None else req.scheduled_time
                if not req.reserved_pages:
                    req.reserved_pages = pages_to_reserve(req, self.pools)
                    self._reserved_pages += req.reserved_pages
                self.running.append(req)
                req.prefill_len, req.prefilled, req.prefill_group = req.num_prefill_tokens, 0, work.group
            # a cached prefix on the group, or in host memory (loaded now): only the rest is computed
            self.prefix_cache.attach(work, fresh, self._load, self._pays)
            if self.prefix_cache.failed_loads:
                self._after_failed_loads(work)
            if not work.requests:  # no room for any new token yet: they continue in a later pass
                continue
            for i, req in enumerate(work.requests):
                remaining = req.prefill_len - req.prefilled
                if work.chunk is not None:  # the executor reads the chunk actually computed
                    work.chunk[i] = remaining = min(work.chunk[i], remaining)
                req.prefilled += remaining
                req.prefill_group = work.group
            try:
                launch = self.executor.prefill(work, [self.pools[i] for i in work.group])
            except Exception as e:
                self._launch_failed("prefill", work.group, work.requests, e)
                continue
            self.launches.append(launch)
            launched += 1
            d = len(work.group)
            self.stats.prefills += 1
            self.stats.count_degree("prefill", d)
            if any(np.unique(p).size < d for p in work.plans):
                self.stats.scale_downs += 1
            if self.timeline is not None:
                kept = sorted({work.group[r] for p in work.plans for r in np.unique(p).tolist()})
                computed = sum(work.chunk) if work.chunk is not None else sum(r.prefill_len for r in work.requests)
                self._record(launch, tokens=computed, kept=tuple(kept))
            if work.piggyback is not None:
                self._count_decode(work.piggyback)
        for work in it.decodes:
            if not work.requests:
                continue
            scale_ups = self._scale_ups(work)  # before the executor reserves the new tokens' slots
            try:
                launch = self.executor.decode(work, [self.pools[i] for i in work.group])
            except Exception as e:
                self._launch_failed("decode", work.group, work.requests, e)
                continue
            launch.started = self.executor.now()
            self.launches.append(launch)
            launched += 1
            self._count_decode(work, scale_ups)
            self._record(launch, tokens=len(work.requests), scaled_up=tuple(sorted(set(scale_ups))))
        return launched

    def _launch_failed(self, kind: str, group: Group, requests: Sequence[Request], error: BaseException) -> None:
        """A program that failed to start or to finish: its requests end with an error (answered, their KV
        freed); instances whose KV pools it left unusable get empty ones, and the other requests that held
        KV there are recomputed. Every other launch and request goes on. A FatalError is raised again."""
        if isinstance(error, FatalError):
            raise error
        failed = [r for r in requests if not r.finished]
        log.error(
            "%s on instances %s failed (%s: %s); failing its %d request(s)",
            kind,
            list(group),
            type(error).__name__,
            error,
            len(failed),
            exc_info=error,
        )
        self.stats.failed_launches += 1
        message = f"the engine failed to run this request's {kind} ({type(error).__name__}: {error})"
        for req in failed:
            self._fail(req, message)
        for i in self.executor.repair(group):
            for req in [r for r in self.running if self.pools[i].tokens.get(r.rid, 0)]:
                self._preempt(req)
            self.prefix_cache.flush([i])  # its cached pages' K/V is gone too

    def _fail(self, req: Request, message: str) -> None:
        """End a request with an error (its KV is freed, its reservation returned)."""
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason, req.error = Status.FINISHED, "error", message
        req.finish_time = self.executor.now()
        self._retire(req)
        self._failed.append(req)
        self._changed = True

    def _scale_ups(self, work: DecodeWork) -> list[int]:
        """The master instance of each request of a decode step that holds none of its KV yet."""
        group, pools = work.group, self.pools
        return [group[m] for r, m in zip(work.requests, work.masters) if not pools[group[m]].tokens.get(r.rid, 0)]

    def _count_decode(self, work: DecodeWork, scale_ups: list[int] | None = None) -> None:
        self.stats.scale_ups += len(self._scale_ups(work) if scale_ups is None else scale_ups)
        self.stats.decode_launches += 1
        self.stats.count_degree("decode", len(work.group))
        if len(self.stats.decode_batches) < 4096 or len(work.requests) in self.stats.decode_batches:  # bounded
            self.stats.decode_batches[len(work.requests)] += 1

    def _collect(self) -> list[Request]:
        """Apply the sampled tokens of every ready launch and free its instances."""
        touched: list[Request] = []
        still, done = [], []
        for launch in self.launches:
            if not launch.pending.ready() or (launch.follows is not None and not launch.follows.collected):
                still.append(launch)
                continue
            self._changed = True
            launch.collected = True
            self._timed(launch)
            if launch.span is not None:
                launch.span.end = self.executor.now()
                if launch.successor is not None and launch.successor.span is not None:  # it starts now
                    launch.successor.span.start = launch.span.end
            if not launch.ranks:
                continue
            try:
                out = launch.pending.result()
            except Exception as e:  # the program failed while running
                if launch.span is not None:
                    launch.span.failed = True
                self._launch_failed(launch.kind, launch.group, launch.requests, e)
                continue
            if launch.kind == "prefill":
                done.append(launch)
                out = SamplerOutputs(*(x[:, None] for x in out))  # one step
            got = _apply_tokens(launch.ranks, out, self.executor.now())
            touched += [r for r, _ in got]
            if launch.kind == "decode":
                self.stats.decode_tokens += sum(n for _, n in got)
                self._trim(launch)
        self.launches = still
        for launch in done:  # K/V written by finished prefills can serve other requests now
            for r in launch.requests:
                if not r.finished:
                    self.prefix_cache.publish(r, launch.group)
        for r in touched:
            if r.finished:
                self._retire(r)
        return touched + self._take_failed()

    def _timed(self, launch: Launch) -> None:
        """Note how long a decode step took in a burst just finished (from its dispatch, or from the end of the
        burst it continues; the median of the last few is used, so one that compiled counts for little), and
        start its successor's clock."""
        if launch.work is None or launch.started is None:
            return
        now = self.executor.now()
        self._step_times.append((now - launch.started) / launch.work.steps)
        if launch.successor is not None:
            launch.successor.started = now

    def _trim(self, launch: Launch) -> None:
        """Release the slots a burst reserved and did not fill (its rows stopped early, or a stop string cut
        them on the host: the K/V after it goes too), so that each request holds exactly its tokens' K/V."""
        group = [self.pools[i] for i in launch.group]  # a decoding request's K/V lies in its group
        nxt = launch.successor if launch.successor is not None and not launch.successor.collected else None
        for master, reqs in zip(group, launch.ranks):
            for r in reqs:
                if r.finished:
                    continue  # retired: everything is released
                ahead = nxt.reserved.get(r.rid, 0) if nxt is not None else 0  # the running burst's slots stay
                excess = sum(p.tokens.get(r.rid, 0) for p in group) - r.num_tokens - ahead
                if excess > 0:
                    master.truncate(r.rid, excess)

    def migrate(self, rid: int, src: int, dst: int, n: int) -> None:
        """Move the last n tokens of request rid that instance src holds to instance dst (and wait)."""
        self.execute(Iteration(migrations=[Migration(rid, src, dst, n)]))

    def _migrate(self, src: int, dst: int, moves: list[Migration]) -> Launch:
        """One transfer from src to dst carrying the last tokens of several requests."""
        if src == dst:
            raise ValueError("source and destination instance are the same")
        src_slots, dst_slots = [], []
        for move in moves:
            have = self.pools[src].tokens.get(move.rid, 0)
            if not 0 < move.tokens <= have:
                raise ValueError(f"instance {src} holds {have} tokens of request {move.rid}; cannot move {move.tokens}")
            src_slots.append(self.pools[src].slots(move.rid)[have - move.tokens :])
            positions = self.pools[src].positions(move.rid)[have - move.tokens :]
            dst_slots.append(self.pools[dst].append(move.rid, move.tokens, positions))
            self.pools[src].truncate(move.rid, move.tokens)
            self.stats.migrations += 1
        launch = self.executor.migrate(src, dst, np.concatenate(src_slots), np.concatenate(dst_slots))
        launch.requests.extend(self.requests[m.rid] for m in moves)
        return launch

    def _preempt(self, req: Request) -> None:
        """Drop a running request's KV; it waits at the head of the queue to be recomputed."""
        for pool in self.pools:
            pool.release(req.rid)
        self.running.remove(req)
        req.status = Status.WAITING
        req.prefilled = 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.insert(0, req)
        self._changed = True  # the pools have room now: the policy plans again

    def _retire(self, req: Request) -> None:
        if req.finish_reason in ("stop", "length"):  # its K/V is complete: the next turn may start from it
            self.prefix_cache.publish(req, range(len(self.pools)))
        self.requests.pop(req.rid, None)
        if req in self.running:
            self.running.remove(req)
        self._reserved_pages -= req.reserved_pages
        req.reserved_pages = 0
        for pool in self.pools:
            pool.release(req.rid)


def build_engine(
    cfg: ModelConfig,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer: Tokenizer | None,
    ecfg: EngineConfig,
    dtype: Any,
    seed: int | None = None,
    policy: Policy | None = None,
    devices: list[jax.Device] | None = None,
    cost_model: CostModel | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> Engine:
    """An engine on real devices: the model's weights on every instance, run by the JAX executor, scheduled
    by the elastic scheduler with `cost_model` (a rough stand-in if none) unless a policy is given;
    `compiler_options` go to XLA with every program.

    The KV pools are sized from the memory there is (or the size asked for is checked against it) before
    anything is put on the devices: what cannot fit is a ValueError naming the numbers, never an
    out-of-memory kill."""
    executor = JaxExecutor(
        cfg,
        graphdef,
        state,
        num_instances=ecfg.num_instances,
        tp=ecfg.tp,
        page_size=ecfg.page_size,
        max_pages_per_request=ecfg.pages_for(ecfg.max_model_len),
        dtype=dtype,
        devices=devices,
        min_prefill_bucket=ecfg.min_prefill_bucket,
        max_rows=ecfg.max_num_seqs,
        max_programs=len(warmup_jobs(ecfg)) + EXTRA_PROGRAMS,
        attention=ecfg.attention_backend,
        compiler_options=compiler_options,
        unroll_layers=unroll_layers_on(ecfg, devices),
    )
    log.info("attention backend: %s", executor.attention.name)
    footprint = executor.footprint(sizing_jobs(ecfg))
    programs = executor.programs
    programs.max_programs = program_limit(footprint.maps_per_program, memory_map_room(), programs.max_programs)
    footprint = dataclasses.replace(footprint, program_bytes=programs.max_programs * PROGRAM_HOST_BYTES)
    capacity = size_kv_pools(
        probe_domains(executor.devices),
        footprint,
        num_instances=ecfg.num_instances,
        tp=ecfg.tp,
        page_size=ecfg.page_size,
        utilization=ecfg.memory_utilization,
        requested_tokens=ecfg.kv_tokens_per_instance,
        # every running request at full length on one instance, each with a partial page
        useful_tokens=ecfg.max_num_seqs * (ecfg.max_model_len + ecfg.page_size),
    )
    if jax.process_count() > 1:  # one model and layout, pools of one size everywhere (programs share shapes)
        channel = PlanChannel.from_jax()
        channel.check_same("model", f"{cfg!r} {jnp.dtype(dtype).name}")
        channel.check_same("engine configuration", repr(dataclasses.replace(ecfg, kv_tokens_per_instance=None)))
        tokens = channel.agree_min("kv_tokens_per_instance", capacity.tokens_per_instance)
        capacity = dataclasses.replace(capacity, tokens_per_instance=tokens)
        if jax.process_index() == 0:
            executor.peers = Leader(
                channel,
                executor.instances.owner,
                heartbeat_timeout_s=ecfg.heartbeat_timeout_s,
                step_timeout_s=ecfg.step_timeout_s,
            )
    ecfg = dataclasses.replace(ecfg, kv_tokens_per_instance=capacity.tokens_per_instance)
    ecfg.check_fits_one_request()
    tier_pages, page_shape = 0, (cfg.num_layers, cfg.num_kv_heads, ecfg.page_size, cfg.head_dim)  # K (or V) of a page
    if ecfg.enable_prefix_caching and ecfg.host_kv_cache_gib != 0:
        page_bytes = 2 * math.prod(page_shape) * jnp.dtype(dtype).itemsize
        on_host = capacity.bytes_per_instance * sum(executor.instances.local) if capacity.domain == "host" else 0
        tier_pages = size_host_tier(ecfg.host_kv_cache_gib, page_bytes, host_available_bytes(), on_host)
        if jax.process_count() > 1:  # each process keeps its instances' tier; the leader's bookkeeping is alike
            tier_pages = PlanChannel.from_jax().agree_min("host_tier_pages", tier_pages)
    executor.allocate(ecfg.num_pages)
    engine = Engine(cfg, ecfg, executor, tokenizer, seed, policy)
    engine.kv_capacity = capacity
    if tier_pages:
        executor.host_store = PageStore(tier_pages, page_shape, dtype)
        owner = executor.instances.owner
        for process in sorted(set(owner)):
            tier = HostTier(tier_pages, executor.host_store.page_bytes)
            engine.use_host_tier(tier, [i for i, p in enumerate(owner) if p == process])
        log.info(
            "host KV cache tier: %s pages = %s tokens (%.2f GiB) per process, pages evicted from the pools are "
            "kept there",
            f"{tier.capacity:,}",
            f"{tier.capacity * ecfg.page_size:,}",
            tier.capacity_bytes / (1 << 30),
        )
    if policy is None and cost_model is not None:
        engine.policy = engine.default_policy(cost_model)
    return engine


def sizing_jobs(ecfg: EngineConfig) -> list[tuple[str, tuple[int, ...], int, int]]:
    """The programs whose temporaries bound every program's: the largest prefill (one instance holds the
    most tokens per rank; appending to held K/V), the largest decode batch alone and on the widest group
    (all-gathered queries), and the largest migration transfer."""
    lo, n = ecfg.min_prefill_bucket, ecfg.num_instances
    tokens, rows = bucket(ecfg.max_prefill_tokens, lo), bucket(ecfg.max_num_seqs)
    jobs = [("append", (0,), tokens, prefill_rows(tokens, lo, ecfg.max_num_seqs)), ("decode", (0,), rows, rows)]
    if n > 1:  # a decode group may span every instance
        jobs += [("decode", tuple(range(n)), rows, rows), ("migrate", (0, 1), MAX_MIGRATE_TOKENS, 0)]
    return jobs


def unroll_layers_on(ecfg: EngineConfig, devices: list[jax.Device] | None) -> bool:
    """Whether programs run the layers unrolled over per-layer weights: as configured, else on accelerators
    (each step reads the weights in place) but not on CPU, where unrolled programs compile 2-3x slower and
    take twice the memory mappings for a 1.57x faster decode (docs/performance.md)."""
    if ecfg.unroll_layers is not None:
        return ecfg.unroll_layers
    return (devices or jax.devices())[0].platform != "cpu"


def warmup_jobs(ecfg: EngineConfig) -> list[tuple[str, tuple[int, ...], int, int, SamplerFlags]]:
    """The default warm set: every aligned power-of-two group of instances (the device sets the policy
    uses, 2N - 1 of them), with each prefill token bucket up to max_prefill_tokens / degree per rank (whole
    prompts, and passes appending to K/V held: later chunks and prefix hits) and
    each decode batch bucket up to max_num_seqs in single steps, in every sampler variant (greedy, sampling,
    with extras); then the same decodes in bursts of decode_steps. Where the program cache cannot keep them
    all (a process's memory-map limit), the first ones are warmed: bursts come last, as single steps are
    what a busy engine runs (a program not warmed compiles on first use, off the engine loop)."""
    n, lo = ecfg.num_instances, ecfg.min_prefill_bucket
    jobs, bursts = [], []
    for size in _powers(n):
        for start in range(0, n - size + 1, size):
            group = tuple(range(start, start + size))
            for t in _powers(bucket(-(-ecfg.max_prefill_tokens // size), lo), lo):  # SchedulerView.rank_token_cap
                for kind in ("prefill", "append"):
                    jobs.append((kind, group, t, prefill_rows(t, lo, ecfg.max_num_seqs)))
            for b in _powers(bucket(ecfg.max_num_seqs)):
                jobs.append(("decode", group, b, 1))
                if ecfg.decode_steps > 1:
                    bursts.append(("decode", group, b, ecfg.decode_steps))
    return [(*job, flags) for part in (jobs, bursts) for flags in VARIANTS for job in part]


def _apply_tokens(ranks: Sequence[Sequence[Request]], out: SamplerOutputs, now: float) -> list[tuple[Request, int]]:
    """Give each row's sampled tokens ([d, steps, rows] outputs; -1 once the device stopped the row) to its
    request, step by step, until the request finishes (the host also sees stop strings). Returns each request
    given tokens, with how many."""
    tokens, logprob = out.tokens.tolist(), out.logprob.tolist()
    touched = []
    for k, reqs in enumerate(ranks):
        for i, r in enumerate(reqs):
            if r.finished:  # aborted while its program ran
                continue
            want, before = r.params.logprobs or 0, len(r.output_ids)
            for s in range(len(tokens[k])):
                token = tokens[k][s][i]
                if token < 0 or r.finished:
                    break
                top = []
                if want:
                    top = list(zip(out.top_ids[k, s, i, :want].tolist(), out.top_logprobs[k, s, i, :want].tolist()))
                r.append_token(token, logprob[k][s][i], top, now)
            touched.append((r, len(r.output_ids) - before))
    return touched


def _powers(limit: int, start: int = 1) -> list[int]:
    """start, 2 * start, ... up to limit."""
    out = [start]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    return out
