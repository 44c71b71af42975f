"""One instance's KV pool: device arrays with token slots grouped in pages, and the host allocator.

Device layout: K and V are [num_layers, num_kv_heads, num_pages * page_size, head_dim] (head-major, so
that decode attention gathers whole pages per head without a transposed copy); slot
`page * page_size + offset` holds one token. A request's tokens on an instance fill its pages in order,
so its `n` local tokens sit in the first `n` slots of its page list. Per-instance pools are the building
blocks of the unified distributed pool: any token of any request may live in any instance's pool.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class KVCache(NamedTuple):
    k: jnp.ndarray
    v: jnp.ndarray


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for."""


class PagePool:
    """Free-list allocator of one instance's pages, plus the token slots each request holds there.

    Pages may be shared: a full page can be published under a prefix key (see `prefix_keys`) and later
    given to other requests whose tokens start the same way. A page counts the requests holding it; a
    cached page no request holds stays cached but counts as free, and is evicted, least recently released
    first, when a page is needed and the free list is empty. A page a request holds is never evicted."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs >= 1 page of >= 1 token, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self.pages: dict[int, list[int]] = {}  # request id -> its pages here, in fill order
        self.tokens: dict[int, int] = {}  # request id -> tokens it holds here
        self._refs: dict[int, int] = {}  # page -> how many requests hold it (free and idle pages: none)
        self.cached: dict[bytes, int] = {}  # prefix key -> the page holding that prefix's last page of tokens
        self._key_of: dict[int, bytes] = {}  # cached page -> its key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages no request holds, oldest first
        self.evictions = 0

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages a request can get: free ones and cached ones no request holds (evicted when taken)."""
        return len(self._free) + len(self._idle)

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
        if extra > self.free_pages:
            raise OutOfPages(f"need {extra} pages, {self.free_pages} free")
        pages = self.pages.setdefault(rid, [])
        for _ in range(extra):
            page = self._take()
            self._refs[page] = 1
            pages.append(page)
        start = self.tokens.get(rid, 0)
        self.tokens[rid] = start + n
        return self._slot_ids(rid, np.arange(start, start + n))

    def _take(self) -> int:
        """A page for a new use: a free one, else the least recently released cached page (evicted)."""
        if self._free:
            return self._free.pop()
        page, _ = self._idle.popitem(last=False)
        del self.cached[self._key_of.pop(page)]
        self.evictions += 1
        return page

    def _unref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            del self._refs[page]
            if page in self._key_of:
                self._idle[page] = None
            else:
                self._free.append(page)

    def _slot_ids(self, rid: int, idx: np.ndarray) -> np.ndarray:
        """Slots of request rid's local tokens number idx (its pages are filled in order)."""
        pages = np.asarray(self.pages.get(rid, []), np.int64)
        return pages[idx // self.page_size] * self.page_size + idx % self.page_size

    def slots(self, rid: int) -> np.ndarray:
        """Slot ids of all tokens request rid holds here, in fill order."""
        return self._slot_ids(rid, np.arange(self.tokens.get(rid, 0)))

    def truncate(self, rid: int, n: int) -> None:
        """Forget the last n tokens request rid holds here and let go of the pages they leave empty."""
        have = self.tokens.get(rid, 0)
        if not 0 <= n <= have:
            raise ValueError(f"request {rid} holds {have} tokens here, cannot drop {n}")
        if n == have:
            self.release(rid)
            return
        self.tokens[rid] = have - n
        keep = -(-(have - n) // self.page_size)
        pages = self.pages[rid]
        for page in reversed(pages[keep:]):
            self._unref(page)
        del pages[keep:]

    def release(self, rid: int) -> None:
        """Let go of every page of request rid (cached ones stay cached)."""
        for page in reversed(self.pages.pop(rid, [])):
            self._unref(page)
        self.tokens.pop(rid, None)

    def publish(self, rid: int, index: int, key: bytes) -> None:
        """Cache request rid's page number `index` here (a full page) under a prefix key; a key cached
        already keeps its page."""
        page = self.pages[rid][index]
        if (index + 1) * self.page_size > self.tokens[rid]:
            raise ValueError(f"page {index} of request {rid} is not full; only full pages are shared")
        if key not in self.cached and page not in self._key_of:
            self.cached[key] = page
            self._key_of[page] = key

    def share(self, rid: int, keys: list[bytes]) -> None:
        """Give request rid, which holds nothing here yet, the cached pages of these keys as its first
        tokens here, in order."""
        if rid in self.pages:
            raise ValueError(f"request {rid} already holds tokens here; shared pages come first")
        missing = [k for k in keys if k not in self.cached]
        if missing:
            raise KeyError(f"{len(missing)} of the prefix pages are not cached here")
        pages = [self.cached[k] for k in keys]
        for page in pages:
            self._idle.pop(page, None)
            self._refs[page] = self._refs.get(page, 0) + 1
        self.pages[rid] = pages
        self.tokens[rid] = len(pages) * self.page_size

    def flush(self) -> None:
        """Drop every cached key; pages no request holds become free."""
        for page in self._idle:
            self._free.append(page)
        self._idle.clear()
        self.cached.clear()
        self._key_of.clear()


def prefix_keys(token_ids: Sequence[int], page_size: int, salt: bytes = b"") -> list[bytes]:
    """The key of every full page of a token sequence: a hash chained over the token ids of that page and
    all before it (and a salt naming the model), so equal keys mean equal prefixes."""
    keys, parent = [], hashlib.blake2b(salt, digest_size=16).digest()
    ids = np.asarray(token_ids, np.int64)
    for end in range(page_size, len(ids) + 1, page_size):
        parent = hashlib.blake2b(parent + ids[end - page_size : end].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys
