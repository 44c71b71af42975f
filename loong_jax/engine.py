"""The engine loop: admits requests, runs each iteration's group programs, streams tokens.

Host-side state lives here: the queues, the requests, and one page pool per instance (together the
unified distributed KV pool: any token of any request may live on any instance). Each iteration a
policy partitions the instances into groups and says what every group runs; the engine builds the
per-rank inputs, dispatches every group's program (they run at the same time on disjoint devices),
then collects the sampled tokens. Admission is memory-safe: a request's prompt plus its maximum number
of new tokens is reserved in the whole pool, so a running request never runs out of KV.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from checkpoints.tokenizer import Tokenizer
from loong_jax.batching import sampler_flags, sampler_inputs
from loong_jax.config import ModelConfig
from loong_jax.executor import JaxExecutor, Pending
from loong_jax.kv_pool import PagePool
from loong_jax.placement import build_decode, build_prefill
from loong_jax.policy import DecodeWork, IdleFirstPolicy, Iteration, Policy, PrefillWork, SchedulerView
from loong_jax.request import IncrementalDetokenizer, Request, Status
from loong_jax.sampling import SamplingParams


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long, larger than the whole KV pool, ...)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacities and batching limits of the engine."""

    max_model_len: int
    num_instances: int = 1
    tp: int = 1
    kv_tokens_per_instance: int = 65536
    page_size: int = 16
    max_num_seqs: int = 32
    max_prefill_tokens: int = 4096
    min_prefill_bucket: int = 16
    aligned_groups: bool = True

    def __post_init__(self) -> None:
        if self.kv_tokens_per_instance < self.page_size:
            raise ValueError(f"kv_tokens_per_instance must be >= page_size ({self.page_size})")
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_num_seqs and max_prefill_tokens must be >= 1")
        if self.num_instances < 1 or self.tp < 1:
            raise ValueError(f"num_instances and tp must be >= 1, got {self.num_instances}, {self.tp}")

    @property
    def num_pages(self) -> int:
        return self.kv_tokens_per_instance // self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


@dataclasses.dataclass
class EngineStats:
    """Counters of what only an elastic engine does (exported as metrics)."""

    prefills: int = 0
    decode_steps: int = 0
    scale_downs: int = 0  # prefills whose KV was kept on fewer instances than ran them
    scale_ups: int = 0  # decode steps in which a request got a master that held none of its KV
    migrations: int = 0
    prefill_degrees: list[int] = dataclasses.field(default_factory=list)
    decode_degrees: list[int] = dataclasses.field(default_factory=list)


class Engine:
    """Host-side state (queues, per-instance page pools, requests) around one JaxExecutor."""

    def __init__(
        self,
        cfg: ModelConfig,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        tokenizer: Tokenizer | None,
        ecfg: EngineConfig,
        dtype: Any,
        seed: int | None = None,
        policy: Policy | None = None,
        devices: list[jax.Device] | None = None,
    ):
        self.cfg = cfg
        self.ecfg = ecfg
        self.tokenizer = tokenizer
        self.pools = [PagePool(ecfg.num_pages, ecfg.page_size) for _ in range(ecfg.num_instances)]
        self.executor = JaxExecutor(
            cfg,
            graphdef,
            state,
            num_instances=ecfg.num_instances,
            tp=ecfg.tp,
            num_pages=ecfg.num_pages,
            page_size=ecfg.page_size,
            max_pages_per_request=ecfg.pages_for(ecfg.max_model_len),
            dtype=dtype,
            devices=devices,
        )
        self.policy: Policy = policy or IdleFirstPolicy(ecfg.num_instances, ecfg.aligned_groups)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._reserved_pages = 0
        self._rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
        eos = tokenizer.eos_token_ids if tokenizer is not None else cfg.eos_token_ids
        self.eos_ids = tuple(eos or cfg.eos_token_ids)

    # ----- requests -------------------------------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Validate and queue a request; raises RequestRejected with the limit and the value given."""
        prompt_ids = [int(t) for t in prompt_ids]
        n, limit = len(prompt_ids), self.ecfg.max_model_len
        if n == 0:
            raise RequestRejected("the prompt is empty; give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token ids must be in [0, {self.cfg.vocab_size}), got {bad[:5]}")
        max_new = params.max_tokens if params.max_tokens is not None else limit - n
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
        view = self._view()
        if view.pages_to_reserve(req) > view.total_pages:
            capacity = sum(p.num_slots for p in self.pools)
            raise RequestRejected(
                f"the request needs {n + max_new} tokens of KV cache but the whole pool holds "
                f"{capacity}; reduce the prompt or max_tokens"
            )
        self.requests[req.rid] = req
        self.waiting.append(req)
        return req

    def abort(self, rid: int) -> None:
        """Stop a request at any point and free its KV."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, "abort"
        self._retire(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_used_tokens(self) -> int:
        return sum(p.used_tokens for p in self.pools)

    def holders(self, rid: int) -> dict[int, int]:
        """Instance -> tokens of request rid's KV held there."""
        return {i: p.tokens[rid] for i, p in enumerate(self.pools) if p.tokens.get(rid, 0)}

    # ----- one iteration --------------------------------------------------------------------------

    def _view(self) -> SchedulerView:
        decoding = [r for r in self.running if not r.finished]
        return SchedulerView(
            self.waiting,
            decoding,
            self.pools,
            self.ecfg.max_num_seqs,
            self.ecfg.max_prefill_tokens,
            self._reserved_pages,
            self.ecfg.min_prefill_bucket,
        )

    def step(self) -> list[Request]:
        """One iteration: the policy decides what every group runs, then `execute` runs it."""
        return self.execute(self.policy.schedule(self._view()))

    def execute(self, it: Iteration) -> list[Request]:
        """Dispatch every group's program of an iteration (they run concurrently), then apply the tokens.

        Prefill requests must be waiting; decode requests must be running with their KV on the group.
        """
        launched: list[tuple[list[list[Request]], Pending]] = []
        for work in it.prefills:
            launched.append(self._launch_prefill(work))
        for work in it.decodes:
            if work.requests:
                launched.append(self._launch_decode(work))
        touched = []
        for ranks, pending in launched:
            out = pending.result()
            for k, reqs in enumerate(ranks):
                for i, r in enumerate(reqs):
                    top = list(zip(out.top_ids[k, i].tolist(), out.top_logprobs[k, i].tolist()))
                    r.append_token(int(out.tokens[k, i]), float(out.logprob[k, i]), top[: r.params.logprobs or 0])
                    touched.append(r)
        for r in touched:
            if r.finished:
                self._retire(r)
        return touched

    def _launch_prefill(self, work: PrefillWork) -> tuple[list[list[Request]], Pending]:
        view = self._view()
        now = time.monotonic()
        for req in work.requests:
            self.waiting.remove(req)
            req.status = Status.RUNNING
            req.scheduled_time = now
            req.reserved_pages = view.pages_to_reserve(req)
            self._reserved_pages += req.reserved_pages
            self.running.append(req)
        pools = [self.pools[i] for i in work.group]
        plan = build_prefill(
            [r.prompt_ids for r in work.requests],
            [r.rid for r in work.requests],
            work.plans,
            pools,
            min_tokens=self.ecfg.min_prefill_bucket,
            max_rows=self.ecfg.max_num_seqs,
        )
        d = len(work.group)
        ranks: list[list[Request]] = [[] for _ in range(d)]
        for req, rank in zip(work.requests, plan.sample_rank):
            ranks[rank].append(req)
        flags = sampler_flags(work.requests)
        pending = self.executor.prefill(work.group, plan.inputs, sampler_inputs(ranks, plan.rows, flags), flags)
        self.stats.prefills += 1
        self.stats.prefill_degrees.append(d)
        if any(len(set(p.tolist())) < d for p in work.plans):
            self.stats.scale_downs += 1
        return ranks, pending

    def _launch_decode(self, work: DecodeWork) -> tuple[list[list[Request]], Pending]:
        pools = [self.pools[i] for i in work.group]
        for req, m in zip(work.requests, work.masters):
            if not pools[m].tokens.get(req.rid, 0):
                self.stats.scale_ups += 1
        plan = build_decode(
            [r.rid for r in work.requests],
            [r.output_ids[-1] for r in work.requests],
            [r.num_tokens for r in work.requests],
            work.masters,
            pools,
            self.executor.page_table_width,
        )
        ranks = [[work.requests[i] for i in members] for members in plan.rank_requests]
        flags = sampler_flags(work.requests)
        pending = self.executor.decode(work.group, plan.inputs, sampler_inputs(ranks, plan.rows, flags), flags)
        self.stats.decode_steps += 1
        self.stats.decode_degrees.append(len(work.group))
        return ranks, pending

    def migrate(self, rid: int, src: int, dst: int, n: int) -> None:
        """Move the last n tokens of request rid that instance src holds to instance dst."""
        have = self.pools[src].tokens.get(rid, 0)
        if not 0 < n <= have:
            raise ValueError(f"instance {src} holds {have} tokens of request {rid}; cannot move {n}")
        if src == dst:
            raise ValueError("source and destination instance are the same")
        src_slots = self.pools[src].slots(rid)[have - n :]
        dst_slots = self.pools[dst].append(rid, n)
        self.executor.migrate(src, dst, src_slots, dst_slots)
        self.pools[src].truncate(rid, n)
        self.stats.migrations += 1

    def _retire(self, req: Request) -> None:
        self.requests.pop(req.rid, None)
        if req in self.running:
            self.running.remove(req)
            self._reserved_pages -= req.reserved_pages
        for pool in self.pools:
            pool.release(req.rid)
