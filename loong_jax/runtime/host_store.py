"""The K/V of a host tier's slots in this process's memory (the tier's bookkeeping is
`loong_jax.prefix.host_tier`): written from device arrays as their copies arrive, read for loads.

The executor gathers evicted pages into one device array and starts its copy to the host without waiting
(`stage`); the copy is filed into its slots once it has arrived, and a read of a slot waits for a copy on
its way there. Two arrays of `capacity` pages are allocated once: host memory is touched only as pages
are written, and never grows past them.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger("loong_jax")
MAX_VIEWS = 8  # a load in more pieces than this copies its pages into one array instead


class PageStore:
    """K and V of a host tier's slots in this process's memory, filled from device arrays as they arrive."""

    def __init__(self, capacity_pages: int, page_shape: Sequence[int], dtype: Any):
        """page_shape: one page's K (or V) of every layer, [layers, kv heads, page size, head dim]."""
        self.k = np.empty((capacity_pages, *page_shape), dtype)  # backed by memory once written
        self.v = np.empty((capacity_pages, *page_shape), dtype)
        self._pending: deque[tuple[np.ndarray, Any, Any]] = deque()  # (slots, K, V) on their way to the host
        self._bad: set[int] = set()  # slots whose copy failed: reading them is an error
        self._reads: list[tuple[set[int], Any]] = []  # (slots, what is ready once the load reading them is done)
        self.filed_pages = 0  # pages written, in all

    @property
    def capacity(self) -> int:
        return len(self.k)

    @property
    def page_bytes(self) -> int:
        return 2 * self.k[0].nbytes

    def stage(self, slots: Sequence[int], k: Any, v: Any) -> None:
        """Device arrays K and V [n, *page_shape] (n >= len(slots); the rest is padding) still being computed,
        for these slots: their copy to the host starts now and is filed once it has arrived."""
        self.poll()
        for x in (k, v):
            x.copy_to_host_async()
        self._pending.append((np.asarray(slots, np.int64), k, v))

    def write(self, slots: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Write K and V [len(slots), *page_shape] into slots (once the loads reading them have finished)."""
        slots = np.asarray(slots, np.int64)
        for reading, done in self._reads:
            if reading.intersection(slots.tolist()):
                with contextlib.suppress(Exception):  # a load that failed reads nothing any more
                    jax.block_until_ready(done)
        self.k[slots], self.v[slots] = k[: len(slots)], v[: len(slots)]
        self._bad.difference_update(slots.tolist())
        self.filed_pages += len(slots)

    def poll(self, wait_for: Sequence[int] = ()) -> None:
        """File the copies that have arrived, in the order they were staged, waiting for those on their way
        to any of the slots in wait_for. A copy that failed leaves its slots unreadable."""
        waiting = set(wait_for)
        while self._pending:
            slots, k, v = self._pending[0]
            must = any(waiting.intersection(s.tolist()) for s, _, _ in self._pending)  # FIFO: file up to it
            if not must and not (k.is_ready() and v.is_ready()):
                break
            self._pending.popleft()
            try:
                self.write(slots, np.asarray(k), np.asarray(v))
            except Exception as e:  # the gather or the copy failed: these pages are lost, nothing else
                log.warning("copying %d pages to the host tier failed (%s); they are dropped", len(slots), e)
                self.lose(slots)

    def lose(self, slots: Sequence[int]) -> None:
        """Mark slots as holding no K/V (their copy failed): reading them is an error until rewritten."""
        self._bad.update(int(s) for s in slots)

    def views(self, slots: Sequence[int], most: int) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
        """The K and V of these slots as views into the store, no copy: (positions in `slots`, K, V) per run of
        consecutive slots, each of a power-of-two length up to `most` (so that the programs loading them come
        in few shapes). Until `reading` is told a load of them has finished, no copy is filed into these slots. Slots
        scattered over more than MAX_VIEWS pieces are copied instead, in power-of-two pieces."""
        self._readable(slots)
        order = sorted(range(len(slots)), key=lambda j: slots[j])
        runs, at = [], 0
        while at < len(order):
            end = at + 1
            while end < len(order) and slots[order[end]] == slots[order[end - 1]] + 1:
                end += 1
            runs += _pieces(at, end, most)
            at = end
        if len(runs) <= MAX_VIEWS:
            first = [slots[order[a]] for a, _ in runs]
            return [(order[a:b], self.k[f : f + b - a], self.v[f : f + b - a]) for (a, b), f in zip(runs, first)]
        parts = []
        for a, b in _pieces(0, len(order), most):
            taken = np.asarray([slots[j] for j in order[a:b]], np.int64)
            parts.append((order[a:b], self.k[taken], self.v[taken]))
        return parts

    def reading(self, slots: Sequence[int], done: Any) -> None:
        """A load reads these slots' memory until `done` (device arrays) is computed: copies to them wait."""
        self._reads = [(s, d) for s, d in self._reads if not all(x.is_ready() for x in jax.tree.leaves(d))]
        self._reads.append((set(slots), done))

    def _readable(self, slots: Sequence[int]) -> None:
        self.poll(slots)
        bad = self._bad.intersection(slots)
        if bad:
            raise RuntimeError(f"host tier slots {sorted(bad)} hold no K/V (their copy from the device failed)")


def _pieces(start: int, end: int, most: int) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of power-of-two lengths up to most (a power of two), largest first."""
    out = []
    while start < end:
        n = min(most, 1 << ((end - start).bit_length() - 1))
        out.append((start, start + n))
        start += n
    return out
