"""One instance's KV pool: device arrays with token slots grouped in pages, and the host allocator.

Device layout: K and V are [num_layers, num_kv_heads, num_pages * page_size, head_dim] (head-major, so
that decode attention gathers whole pages per head without a transposed copy); slot
`page * page_size + offset` holds one token. A request's tokens on an instance fill its pages in order,
so its `n` local tokens sit in the first `n` slots of its page list; the pool also records which
positions of the request's sequence those tokens are (a plan may scatter them), so that full pages holding
whole aligned prefix pages can be cached. Per-instance pools are the building
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
        self._runs: dict[int, list[list[int]]] = {}  # request id -> [first position, count] runs, in fill order
        self._refs: dict[int, int] = {}  # page -> how many requests hold it (free and idle pages: none)
        self.cached: dict[bytes, int] = {}  # prefix key -> the page holding that prefix's last page of tokens
        self._key_of: dict[int, bytes] = {}  # cached page -> its key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages no request holds, oldest first
        self.evictions = 0
        self.published = 0  # pages cached under a new key (what a write-through host tier would copy)
        # (page, key) of cached pages evicted since the host tier last saved them (None: nobody saves them)
        self.evicted: list[tuple[int, bytes]] | None = None

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

    def room(self, rid: int) -> int:
        """How many more tokens request rid can append here: the rest of its last page, and the pages free."""
        return (
            len(self.pages.get(rid, ())) * self.page_size - self.tokens.get(rid, 0) + self.free_pages * self.page_size
        )

    def append(self, rid: int, n: int, positions: int | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Reserve the next n token slots of request rid here; returns their slot ids. positions: where the
        tokens are in the request's sequence (the first of n consecutive ones, or one per token; None:
        unknown, and the pages they fill are never cached)."""
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
        self._record(rid, n, positions)
        return self._slot_ids(rid, np.arange(start, start + n))

    def _record(self, rid: int, n: int, positions: int | Sequence[int] | np.ndarray | None) -> None:
        """Append the positions of n new tokens of request rid to its runs."""
        runs = self._runs.setdefault(rid, [])
        if n == 0:
            return
        if positions is None:
            new = [[-1, n]]
        elif np.ndim(positions) == 0:
            new = [[int(positions), n]]
        else:
            pos = np.asarray(positions, np.int64)
            if len(pos) != n:
                raise ValueError(f"{len(pos)} positions given for {n} tokens")
            cuts = np.nonzero(np.diff(pos) != 1)[0] + 1
            new = [[int(c[0]), len(c)] for c in np.split(pos, cuts)]
        for start, count in new:
            last = runs[-1] if runs else None
            if last is not None and start >= 0 and last[0] >= 0 and last[0] + last[1] == start:
                last[1] += count
            else:
                runs.append([start, count])

    def positions(self, rid: int) -> np.ndarray:
        """Positions in request rid's sequence of the tokens it holds here, in fill order (-1: unknown)."""
        parts = [np.arange(s, s + c) if s >= 0 else np.full(c, -1) for s, c in self._runs.get(rid, [])]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def aligned_pages(self, rid: int) -> list[tuple[int, int]]:
        """(local page index, prefix page number) of request rid's full pages here that hold exactly one
        whole page of its sequence (positions j * page_size onwards): the pages that can be cached."""
        out, at, page = [], 0, self.page_size
        for start, count in self._runs.get(rid, []):
            first = at + (-at) % page  # the run's first local index that starts a page
            for k in range(first, at + count - page + 1, page):
                p = start + k - at
                if start >= 0 and p % page == 0:
                    out.append((k // page, p // page))
            at += count
        return out

    def _take(self) -> int:
        """A page for a new use: a free one, else the least recently released cached page (evicted)."""
        if self._free:
            return self._free.pop()
        page, _ = self._idle.popitem(last=False)
        if self.evicted is not None:  # its K/V is saved before the program that reuses the page runs
            self.evicted.append((page, self._key_of[page]))
        self._uncache(page)
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
        keep = -(-(have - n) // self.page_size)
        pages = self.pages[rid]
        last = pages[keep - 1]
        if (have - n) % self.page_size and (self._refs[last] > 1 or last in self._key_of):
            if self._refs[last] > 1:  # later tokens would be written into a page others read
                raise ValueError(f"cannot cut request {rid}'s tokens inside a page it shares with other requests")
            self._uncache(last)  # it is about to be refilled: its cached contents change
        self.tokens[rid] = have - n
        for page in reversed(pages[keep:]):
            self._unref(page)
        del pages[keep:]
        runs, drop = self._runs[rid], n
        while drop:
            take = min(drop, runs[-1][1])
            runs[-1][1] -= take
            drop -= take
            if not runs[-1][1]:
                runs.pop()

    def _uncache(self, page: int) -> None:
        del self.cached[self._key_of.pop(page)]

    def release(self, rid: int) -> None:
        """Let go of every page of request rid (cached ones stay cached)."""
        for page in reversed(self.pages.pop(rid, [])):
            self._unref(page)
        self.tokens.pop(rid, None)
        self._runs.pop(rid, None)

    def publish(self, rid: int, index: int, key: bytes) -> None:
        """Cache request rid's page number `index` here (a full page) under a prefix key; a key cached
        already keeps its page."""
        page = self.pages[rid][index]
        if (index + 1) * self.page_size > self.tokens[rid]:
            raise ValueError(f"page {index} of request {rid} is not full; only full pages are shared")
        if key not in self.cached and page not in self._key_of:
            self.cached[key] = page
            self._key_of[page] = key
            self.published += 1

    def share(self, rid: int, keys: list[bytes], numbers: Sequence[int] | None = None) -> None:
        """Give request rid, which holds nothing here yet, the cached pages of these keys as its first
        tokens here, in order; numbers: which pages of its sequence they are (default 0, 1, ...)."""
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
        numbers = np.arange(len(keys)) if numbers is None else np.asarray(numbers, np.int64)
        positions = (numbers[:, None] * self.page_size + np.arange(self.page_size)).ravel()
        self._record(rid, len(positions), positions)

    def check(self) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent: reference counts that are not the holders, a
        held page free or evictable, a page in two places, or pages lost."""
        counts: dict[int, int] = {}
        for pages in self.pages.values():
            for p in pages:
                counts[p] = counts.get(p, 0) + 1
        problems = []
        if counts != self._refs:
            problems.append("reference counts differ from the holders")
        if len(set(self._free)) != len(self._free) or set(self._free) & (set(counts) | set(self._idle)):
            problems.append("a free page is listed twice, held or cached")
        if set(self._idle) & set(counts) or not set(self._idle) <= set(self._key_of):
            problems.append("an evictable page is held or not cached")
        if len(self._free) + len(self._idle) + len(counts) != self.num_pages:
            problems.append("pages are missing")
        if {self.cached[k] for k in self._key_of.values()} != set(self._key_of) or len(self.cached) != len(
            self._key_of
        ):
            problems.append("the cache index is inconsistent")
        if any(sum(c for _, c in self._runs.get(r, [])) != n for r, n in self.tokens.items()):
            problems.append("recorded positions differ from the tokens held")
        if problems:
            raise RuntimeError("page pool: " + "; ".join(problems))

    def flush(self) -> None:
        """Drop every cached key; pages no request holds become free."""
        for page in self._idle:
            self._free.append(page)
        self._idle.clear()
        self.cached.clear()
        self._key_of.clear()
        if self.evicted is not None:
            self.evicted.clear()


def prefix_keys(
    token_ids: Sequence[int], page_size: int, salt: bytes = b"", known: Sequence[bytes] = ()
) -> list[bytes]:
    """The key of every full page of a token sequence: a hash chained over the token ids of that page and
    all before it (and a salt naming the model), so equal keys mean equal prefixes. `known`: the keys of its
    first pages, computed before (only the pages after them are hashed)."""
    keys = list(known)
    parent = keys[-1] if keys else hashlib.blake2b(salt, digest_size=16).digest()
    ids = np.asarray(token_ids, np.int64)
    for end in range((len(keys) + 1) * page_size, len(ids) + 1, page_size):
        parent = hashlib.blake2b(parent + ids[end - page_size : end].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys
