"""The host-memory tier of the prefix cache: K/V of full pages evicted from the instances' pools, kept in
host memory under the same chained prefix keys, and loaded back into whichever instances' pools a later
prefill runs on.

This is the tier's bookkeeping, kept where the engine runs: which prefix keys it holds, in which slot,
least recently used first; it never holds more than its capacity, and never reuses a slot a load is reading
(pinned). The K/V of the slots is kept by the process owning the instances whose pages they are
(`loong_jax.runtime.host_store`): in a multi-host run the leader keeps one tier's bookkeeping per process
and each process the K/V of its own, written and read on the leader's orders.

Write-back: a cached page is copied out only when its pool evicts it (nothing is copied for pages that stay
on the devices), right before the program that will overwrite it is dispatched (`PrefixCache.spill`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence


@dataclasses.dataclass
class HostTierStats:
    """Counters of the tier (exported as metrics)."""

    hits: int = 0  # prefills that loaded pages from it
    hit_tokens: int = 0  # prompt tokens they loaded instead of computing
    loaded_bytes: int = 0  # K/V bytes loaded into pools
    stored_bytes: int = 0  # K/V bytes stored from pools
    load_seconds: float = 0.0  # from a load's dispatch until its pages were in the pool
    save_host_seconds: float = 0.0  # the engine loop's time dispatching saves (and filing arrived copies)
    load_host_seconds: float = 0.0  # the engine loop's time dispatching loads
    stored_pages: int = 0
    evictions: int = 0  # pages dropped from the tier to make room
    prefetched_pages: int = 0  # pages loaded for waiting requests ahead of their prefills
    failed_loads: int = 0  # loads that failed (their pages were computed instead, and dropped from the tier)


class HostTier:
    """Which prefix keys a host tier holds and where: a bounded LRU map from keys to the slots of a store."""

    def __init__(self, capacity_pages: int, page_bytes: int = 0):
        """page_bytes: one page's K and V (counted in the stats; 0 where no K/V is kept, as in the simulator)."""
        if capacity_pages < 1:
            raise ValueError(f"a host tier holds >= 1 page, got {capacity_pages}")
        self.capacity = capacity_pages
        self.page_bytes = page_bytes
        self._slot: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, least recently used first
        self._free: list[int] = []  # slots given back; those from _unused up were never taken
        self._unused = 0
        self._pinned: set[int] = set()  # slots being loaded: not reused until released
        self.stats = HostTierStats()

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.page_bytes

    @property
    def pages(self) -> int:
        return len(self._slot)

    def __contains__(self, key: bytes) -> bool:
        return key in self._slot

    def run(self, keys: Sequence[bytes], start: int) -> int:
        """How many of keys[start:] the tier holds in a row."""
        n = start
        while n < len(keys) and keys[n] in self._slot:
            n += 1
        return n - start

    def pin(self, keys: Sequence[bytes]) -> list[int]:
        """The slots of these keys (held), marked recently used and kept from reuse until `release`."""
        slots = [self._slot[k] for k in keys]
        for k in keys:
            self._slot.move_to_end(k)
        self._pinned.update(slots)
        return slots

    def release(self, slots: Sequence[int]) -> None:
        self._pinned.difference_update(slots)

    def put(self, keys: Sequence[bytes]) -> list[int | None]:
        """Take a slot for each key not held (evicting the least recently used pages that no load is reading,
        nor this call took); a key held already is only marked recently used. Returns the slot each key's
        K/V is to be written to (None: held already, or no slot could be freed)."""
        out: list[int | None] = []
        taken: set[int] = set()
        for key in keys:
            if key in self._slot:
                self._slot.move_to_end(key)
                out.append(None)
                continue
            slot = self._take() if len(self._slot) < self.capacity else self._evict(self._pinned | taken)
            if slot is not None:
                self._slot[key] = slot
                taken.add(slot)
                self.stats.stored_pages += 1
                self.stats.stored_bytes += self.page_bytes
            out.append(slot)
        return out

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        self._unused += 1
        return self._unused - 1

    def _evict(self, keep: set[int]) -> int | None:
        """The slot of the least recently used page whose slot is not in keep, dropped from the tier."""
        for key, slot in self._slot.items():
            if slot not in keep:
                del self._slot[key]
                self.stats.evictions += 1
                return slot
        return None

    def discard(self, keys: Sequence[bytes]) -> None:
        """Forget these keys (a load of them failed: their copies are not to be trusted)."""
        for key in keys:
            slot = self._slot.pop(key, None)
            if slot is not None:
                self._pinned.discard(slot)
                self._free.append(slot)

    def check(self) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent: a slot in two places, or slots lost."""
        held = list(self._slot.values())
        taken = set(held) | set(self._free)
        if len(taken) != len(held) + len(self._free) or taken != set(range(self._unused)):
            raise RuntimeError("host tier: slots are lost or used twice")
        if not self._pinned <= set(held):
            raise RuntimeError("host tier: a pinned slot holds no page")
