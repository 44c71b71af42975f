"""The simulated executor: the engine loop and scheduler run unchanged while a virtual clock advances.

Each launch keeps the host pools exactly as the JAX executor would (same slot allocation), takes the time
its timing model predicts (the analytical cluster model or a fitted cost model), and "samples" token 0.
Requests are expected to ignore EOS (the paper's workloads fix output lengths). With a host tier, pages
the pools evict enter it by key (no K/V), and a load from it delays the next prefill on its instance by the
time the timing model gives it (not overlapped with compute, as the JAX executor runs it before the prefill).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from loong_jax.model.sampling import SamplerOutputs
from loong_jax.runtime.instances import Group
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.placement import burst_tokens
from loong_jax.runtime.request import Request
from loong_jax.runtime.work import DecodeWork, Launch, PrefillWork


class Timing(Protocol):
    def prefill_time(self, degree: int, lengths: Sequence[int]) -> float: ...

    def decode_time(self, degree: int, batch: int, context: int) -> float: ...

    def migrate_time(self, tokens: int) -> float: ...

    def reload_time(self, tokens: int) -> float: ...


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


@dataclasses.dataclass
class SimPending:
    clock: Clock
    finish: float
    ranks: int
    rows: int
    steps: int | None = None  # a decode burst's steps (outputs [ranks, steps, rows]); None: a prefill's

    def ready(self) -> bool:
        return self.clock.now >= self.finish

    def result(self) -> SamplerOutputs:
        z = np.zeros((self.ranks, self.rows) if self.steps is None else (self.ranks, self.steps, self.rows))
        return SamplerOutputs(z.astype(np.int32), z.astype(np.float32), z[..., None].astype(np.int32), z[..., None])


class SimExecutor:
    """Advances a virtual clock by `timing` (the engine records the launches' spans when asked)."""

    def __init__(self, timing: Timing, page_size: int = 16):
        self.timing = timing
        self.page_size = page_size
        self.clock = Clock()
        self.migrations = 0
        self.before_write: Callable[[Group], None] | None = None  # as the JAX executor's
        self._loaded_at: dict[int, float] = {}  # instance -> when its loads from host memory are done

    def save_pages(self, instance: int, pages: Sequence[int], slots: Sequence[int]) -> None:
        """Evicted pages enter the host tier by key only."""

    def load_pages(self, loads: dict[int, tuple[list[int], list[int]]]) -> None:
        for instance, (pages, _) in loads.items():
            start = max(self.clock.now, self._loaded_at.get(instance, 0.0))  # one link: loads in turn
            self._loaded_at[instance] = start + self.timing.reload_time(len(pages) * self.page_size)

    def can_load(self, instance: int) -> bool:
        """Loads run beside the instance's compute (a GPU's copy engines)."""
        return True

    def poll_host(self) -> None:
        pass

    def when_ready(self, x: Any, done: Callable[[], None]) -> None:
        done()

    def _written(self, group: Group) -> None:
        """Pools of the group were appended to (pages may have been evicted): as before a dispatch."""
        if self.before_write is not None:
            self.before_write(group)

    def now(self) -> float:
        return self.clock.now

    def advance(self, t: float) -> None:
        """Move the clock forward to t (never back): time passing with nothing launched."""
        self.clock.now = max(self.clock.now, t)

    def wait(self, launches: Sequence[Launch], timeout: float | None) -> None:
        first = min(x.pending.finish for x in launches)  # type: ignore[attr-defined]
        self.advance(first if timeout is None else min(first, self.clock.now + timeout))

    def _launch(self, kind, group, ranks, requests, seconds, steps: int | None = None) -> Launch:
        rows = max([len(r) for r in ranks] + [1])
        pending = SimPending(self.clock, self.clock.now + seconds, len(ranks), rows, steps)
        return Launch(kind, group, ranks, pending, list(requests))

    def prefill(self, work: PrefillWork, pools: Sequence[PagePool]) -> Launch:
        d = len(work.group)
        lengths, done = [], []
        for i, req in enumerate(work.requests):
            total = req.prefill_len
            n = total if work.chunk is None else work.chunk[i]
            start = req.prefilled - n  # the engine already counted this pass
            plan = np.asarray(work.plans[i])[start : start + n]
            for r in np.unique(plan):
                mine = np.nonzero(plan == r)[0]
                pools[r].append(req.rid, len(mine), start + mine)
            lengths.append((start, n))
            if start + n >= total:
                done.append(req)
        self._written(work.group)
        if work.chunk is None:
            seconds = self.timing.prefill_time(d, [n for _, n in lengths])
        else:  # a chunk attends to the chunks before it: the difference of two causal prefills
            seconds = self.timing.prefill_time(d, [0]) + sum(  # one launch, then each chunk's own work
                self.timing.prefill_time(d, [s + n]) - self.timing.prefill_time(d, [s]) for s, n in lengths if n
            )
        loaded = max(self._loaded_at.get(i, 0.0) for i in work.group)  # its loads from host memory first
        seconds += max(0.0, loaded - self.clock.now)
        requests: list[Request] = list(work.requests)
        ranks = [done]
        if work.piggyback is not None:
            dec = work.piggyback
            self._reserve_decode(dec, pools)
            context = sum(r.num_tokens for r in dec.requests)
            seconds += self.timing.decode_time(d, len(dec.requests), context) - self.timing.decode_time(d, 0, 0)
            ranks = [done + list(dec.requests)]
            requests += dec.requests
        return self._launch("prefill", work.group, ranks, requests, seconds)

    @staticmethod
    def _reserve_decode(work: DecodeWork, pools: Sequence[PagePool]) -> None:
        """The slots of each request's next tokens at its master, as the JAX executor reserves them."""
        for req, m in zip(work.requests, work.masters):
            n = burst_tokens(pools[m], req.rid, work.steps, req.max_new_tokens - len(req.output_ids))
            pools[m].append(req.rid, n, req.num_tokens + np.arange(n))

    def can_chain(self, group: Group) -> bool:
        """No: what chaining saves is the host's time between bursts, which the simulator does not model."""
        return False

    def decode(self, work: DecodeWork, pools: Sequence[PagePool], after: Launch | None = None) -> Launch:
        """A burst: its steps one after another (the context's growth inside it is not priced)."""
        self._reserve_decode(work, pools)
        self._written(work.group)
        context = sum(r.num_tokens for r in work.requests)
        seconds = self.timing.decode_time(len(work.group), len(work.requests), context) * work.steps
        ranks = [[] for _ in work.group]
        for req, m in zip(work.requests, work.masters):
            ranks[m].append(req)
        return self._launch("decode", work.group, ranks, work.requests, seconds, work.steps)

    def repair(self, group: Group) -> list[int]:
        """Simulated programs never leave pools unusable."""
        return []

    def migrate(self, src: int, dst: int, src_slots: np.ndarray, dst_slots: np.ndarray) -> Launch:
        self.migrations += 1
        self._written((src, dst))
        seconds = self.timing.migrate_time(len(src_slots))
        return self._launch("migrate", (src, dst), [], [], seconds)
