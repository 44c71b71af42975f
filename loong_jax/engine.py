"""The engine loop: admits requests, runs packed prefill batches and decode steps, streams tokens.

This is the single-instance engine: one executor, one KV pool, continuous batching (requests join after
their prefill and leave when they finish). Admission is memory-safe: a request is admitted only if its
prompt plus its maximum number of new tokens fits in the pages not already promised to running requests,
so a running request never runs out of KV.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from checkpoints.tokenizer import Tokenizer
from loong_jax.batching import bucket, decode_inputs, prefill_inputs, sampler_flags, sampler_inputs
from loong_jax.config import ModelConfig
from loong_jax.executor import JaxExecutor
from loong_jax.kv_pool import PagePool
from loong_jax.request import IncrementalDetokenizer, Request, Status
from loong_jax.sampling import SamplingParams


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long, larger than the whole KV pool, ...)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacities and batching limits of the engine."""

    max_model_len: int
    kv_tokens_per_instance: int = 65536
    page_size: int = 16
    max_num_seqs: int = 32
    max_prefill_tokens: int = 4096
    min_prefill_bucket: int = 64

    def __post_init__(self) -> None:
        if self.kv_tokens_per_instance < self.page_size:
            raise ValueError(f"kv_tokens_per_instance must be >= page_size ({self.page_size})")
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_num_seqs and max_prefill_tokens must be >= 1")

    @property
    def num_pages(self) -> int:
        return self.kv_tokens_per_instance // self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


class Engine:
    """Host-side state (queues, page pool, requests) around one JaxExecutor."""

    def __init__(
        self,
        cfg: ModelConfig,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        tokenizer: Tokenizer | None,
        ecfg: EngineConfig,
        dtype: Any,
        seed: int | None = None,
    ):
        self.cfg = cfg
        self.ecfg = ecfg
        self.tokenizer = tokenizer
        self.pool = PagePool(ecfg.num_pages, ecfg.page_size)
        self.executor = JaxExecutor(
            cfg,
            graphdef,
            state,
            num_pages=ecfg.num_pages,
            page_size=ecfg.page_size,
            max_pages_per_request=ecfg.pages_for(ecfg.max_model_len),
            dtype=dtype,
        )
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
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
        pages = self.ecfg.pages_for(n + max_new)
        if pages > self.pool.num_pages:
            raise RequestRejected(
                f"the request needs {n + max_new} tokens of KV cache but the whole pool holds "
                f"{self.pool.num_slots}; reduce the prompt or max_tokens"
            )
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63 - 1))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        req = Request(next(self._ids), prompt_ids, params, max_new, seed, self.eos_ids, detok)
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
        return self.pool.used_tokens

    # ----- one iteration --------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Prefill newly admitted requests, then one decode step for all running ones."""
        touched: list[Request] = []
        batch = self._admit()
        if batch:
            self._prefill(batch)
            touched += batch
        decoding = [r for r in self.running if not r.finished]
        if decoding:
            self._decode(decoding)
            touched += [r for r in decoding if r not in touched]
        for r in touched:
            if r.finished and r in self.running:
                self._retire(r)
        return touched

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        tokens = 0
        while self.waiting and len(self.running) < self.ecfg.max_num_seqs:
            req = self.waiting[0]
            n = len(req.prompt_ids)
            if batch and tokens + n > self.ecfg.max_prefill_tokens:
                break
            pages = self.ecfg.pages_for(n + req.max_new_tokens)
            if self._reserved_pages + pages > self.pool.num_pages:
                break
            self.waiting.pop(0)
            self._reserved_pages += pages
            req.status = Status.RUNNING
            self.running.append(req)
            batch.append(req)
            tokens += n
        return batch

    def _prefill(self, batch: list[Request]) -> None:
        slots = [self.pool.append(r.rid, len(r.prompt_ids)) for r in batch]
        total = sum(len(r.prompt_ids) for r in batch)
        rows = bucket(len(batch))
        inp = prefill_inputs(
            [r.prompt_ids for r in batch],
            slots,
            self.pool.num_slots,
            bucket(total, self.ecfg.min_prefill_bucket),
            rows,
        )
        flags = sampler_flags(batch)
        out = self.executor.prefill(inp, sampler_inputs(batch, rows, flags), flags)
        self._apply(batch, out)

    def _decode(self, reqs: list[Request]) -> None:
        tokens = [r.output_ids[-1] for r in reqs]
        positions = [r.num_tokens for r in reqs]
        kv_lens = [self.pool.tokens[r.rid] for r in reqs]
        slots = [int(self.pool.append(r.rid, 1)[0]) for r in reqs]
        pages = [self.pool.pages[r.rid] for r in reqs]
        rows = bucket(len(reqs))
        inp = decode_inputs(
            tokens,
            positions,
            slots,
            pages,
            kv_lens,
            self.pool.num_slots,
            rows,
            self.executor.page_table_width,
        )
        flags = sampler_flags(reqs)
        out = self.executor.decode(inp, sampler_inputs(reqs, rows, flags), flags)
        self._apply(reqs, out)

    def _apply(self, reqs: list[Request], out: Any) -> None:
        for i, r in enumerate(reqs):
            top = list(zip(out.top_ids[i].tolist(), out.top_logprobs[i].tolist()))[: r.params.logprobs or 0]
            r.append_token(int(out.tokens[i]), float(out.logprob[i]), top)

    def _retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self._reserved_pages -= self.ecfg.pages_for(len(req.prompt_ids) + req.max_new_tokens)
        self.pool.release(req.rid)
