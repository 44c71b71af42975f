"""The host-memory tier of the prefix cache: K/V of full pages evicted from the instances' pools, kept in
host memory under the same chained prefix keys, and loaded back into whichever instances' pools a later
prefill runs on.

Write-back: a cached page is copied out only when its pool evicts it (nothing is copied for pages that stay
on the devices). The executor gathers the evicted pages of an instance into one device array right before
the program that will overwrite them is dispatched (so it reads their old contents), starts the copy to the
host without waiting, and hands it here; `poll` files copies that have arrived, so neither the device nor
the engine loop waits for one. The store is two preallocated arrays of `capacity` pages (host memory is
only touched as pages are stored, and never grows past them), filled and evicted least recently used first.
Without a page shape the tier keeps keys only (the simulator: which pages it would hold, not their K/V).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class HostTierStats:
    """Counters of the tier (exported as metrics)."""

    hits: int = 0  # prefills that loaded pages from it
    hit_tokens: int = 0  # prompt tokens they loaded instead of computing
    loaded_bytes: int = 0  # K/V bytes loaded into pools
    stored_bytes: int = 0  # K/V bytes stored from pools
    load_seconds: float = 0.0  # from a load's dispatch until its pages were in the pool
    save_host_seconds: float = 0.0  # the engine loop's time dispatching saves and filing arrived copies
    stored_pages: int = 0
    evictions: int = 0  # pages dropped from the tier to make room


class HostTier:
    """A bounded LRU store of K/V pages in host memory, keyed by prefix keys."""

    def __init__(self, capacity_pages: int, page_shape: Sequence[int] | None, dtype: Any = None):
        """page_shape: one page's K (or V) of every layer, [layers, kv heads, page size, head dim] (None: keys
        only, no K/V)."""
        if capacity_pages < 1:
            raise ValueError(f"a host tier holds >= 1 page, got {capacity_pages}")
        self.capacity = capacity_pages
        self.k = self.v = None
        if page_shape is not None:  # pages are backed by memory once written
            self.k = np.empty((capacity_pages, *page_shape), dtype)
            self.v = np.empty((capacity_pages, *page_shape), dtype)
        self._slot: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(capacity_pages - 1, -1, -1)) if page_shape is not None else []
        self._pending: deque[tuple[list[bytes], Any, Any, int]] = deque()  # copies on their way to the host
        self.stats = HostTierStats()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page's K and V (0 without them)."""
        return 0 if self.k is None else 2 * self.k[0].nbytes

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.page_bytes

    @property
    def pages(self) -> int:
        return len(self._slot)

    def __contains__(self, key: bytes) -> bool:
        return key in self._slot

    def run(self, keys: Sequence[bytes], start: int) -> int:
        """How many of keys[start:] the tier holds in a row. Copies that have arrived are filed first; one still
        on its way that holds the next key is waited for (a device-to-host copy costs less than recomputing)."""
        self.poll()
        n = start
        while n < len(keys):
            if keys[n] not in self._slot:
                if not any(keys[n] in entry[0] for entry in self._pending):
                    break
                self.poll(wait=True)
                continue
            n += 1
        return n - start

    def read(self, keys: Sequence[bytes]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Copies of the K and V of these pages, [n, *page_shape] each (copies: the tier may reuse its slots
        while they are being loaded; None without K/V); marks them recently used."""
        slots = [self._slot[k] for k in keys]
        for k in keys:
            self._slot.move_to_end(k)
        if self.k is None:
            return None, None
        return self.k[slots], self.v[slots]

    def put(self, keys: Sequence[bytes], k: np.ndarray | None, v: np.ndarray | None) -> None:
        """Store pages (K and V [n, *page_shape]; None without K/V) under their keys, evicting the least
        recently used ones when full; a key held already is only marked recently used."""
        for j, key in enumerate(keys):
            if key in self._slot:
                self._slot.move_to_end(key)
                continue
            if len(self._slot) >= self.capacity:  # full: the least recently used page's slot
                _, slot = self._slot.popitem(last=False)
                self.stats.evictions += 1
            else:
                slot = self._free.pop() if self.k is not None else -1  # -1: no K/V to place
            if self.k is not None:
                self.k[slot], self.v[slot] = k[j], v[j]
            self._slot[key] = slot
            self.stats.stored_pages += 1
            self.stats.stored_bytes += self.page_bytes

    def stage(self, keys: Sequence[bytes], k: Any, v: Any) -> None:
        """Pages whose K and V are device arrays [n, *page_shape] (n >= len(keys); the rest is padding) still
        being computed: their copy to the host starts now, and `poll` stores them once it has arrived (at once
        without K/V)."""
        if self.k is None:
            self.put(keys, None, None)
            return
        for x in (k, v):
            x.copy_to_host_async()
        self._pending.append((list(keys), k, v, len(keys)))

    def poll(self, wait: bool = False) -> None:
        """Store the staged pages whose copy has arrived (all of them, waiting, if wait)."""
        started = time.perf_counter()
        while self._pending:
            keys, k, v, n = self._pending[0]
            if not wait and not (k.is_ready() and v.is_ready()):
                break
            self._pending.popleft()
            self.put(keys, np.asarray(k)[:n], np.asarray(v)[:n])
        self.stats.save_host_seconds += time.perf_counter() - started

    def check(self) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent: a slot in two places, or slots lost."""
        if self.k is None:
            if len(self._slot) > self.capacity:
                raise RuntimeError("host tier: more pages than its capacity")
            return
        held = list(self._slot.values())
        if len(set(held) | set(self._free)) != self.capacity or len(held) + len(self._free) != self.capacity:
            raise RuntimeError("host tier: slots are lost or used twice")
