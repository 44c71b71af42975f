"""One instance's KV pool: device arrays with token slots grouped in pages, and the host allocator.

Device layout: K and V are [num_layers, num_kv_heads, num_pages * page_size, head_dim] (head-major, so
that decode attention gathers whole pages per head without a transposed copy); slot
`page * page_size + offset` holds one token. A request's tokens on an instance fill its pages in order,
so its `n` local tokens sit in the first `n` slots of its page list. Per-instance pools are the building
blocks of the unified distributed pool: any token of any request may live in any instance's pool.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class KVCache(NamedTuple):
    k: jnp.ndarray
    v: jnp.ndarray


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for."""


class PagePool:
    """Free-list allocator of one instance's pages, plus the token slots each request holds there."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs >= 1 page of >= 1 token, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self.pages: dict[int, list[int]] = {}  # request id -> its pages here, in fill order
        self.tokens: dict[int, int] = {}  # request id -> tokens it holds here

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        return sum(self.tokens.values())

    def pages_needed(self, rid: int, extra_tokens: int) -> int:
        have = len(self.pages.get(rid, ()))
        need = -(-(self.tokens.get(rid, 0) + extra_tokens) // self.page_size)
        return max(0, need - have)

    def append(self, rid: int, n: int) -> np.ndarray:
        """Reserve the next n token slots of request rid here; returns their slot ids."""
        extra = self.pages_needed(rid, n)
        if extra > len(self._free):
            raise OutOfPages(f"need {extra} pages, {len(self._free)} free")
        pages = self.pages.setdefault(rid, [])
        for _ in range(extra):
            pages.append(self._free.pop())
        start = self.tokens.get(rid, 0)
        self.tokens[rid] = start + n
        return self._slot_ids(rid, np.arange(start, start + n))

    def _slot_ids(self, rid: int, idx: np.ndarray) -> np.ndarray:
        """Slots of request rid's local tokens number idx (its pages are filled in order)."""
        pages = np.asarray(self.pages.get(rid, []), np.int64)
        return pages[idx // self.page_size] * self.page_size + idx % self.page_size

    def slots(self, rid: int) -> np.ndarray:
        """Slot ids of all tokens request rid holds here, in fill order."""
        return self._slot_ids(rid, np.arange(self.tokens.get(rid, 0)))

    def truncate(self, rid: int, n: int) -> None:
        """Forget the last n tokens request rid holds here and free the pages they leave empty."""
        have = self.tokens.get(rid, 0)
        if not 0 <= n <= have:
            raise ValueError(f"request {rid} holds {have} tokens here, cannot drop {n}")
        if n == have:
            self.release(rid)
            return
        self.tokens[rid] = have - n
        keep = -(-(have - n) // self.page_size)
        pages = self.pages[rid]
        self._free.extend(reversed(pages[keep:]))
        del pages[keep:]

    def release(self, rid: int) -> None:
        """Free every page of request rid."""
        self._free.extend(reversed(self.pages.pop(rid, [])))
        self.tokens.pop(rid, None)
