"""Ahead-of-time compiled programs keyed by kind, static options and input shapes, with a compile counter.

The cache holds at most `max_programs` programs (least recently used out first): a compiled program costs
host memory (about 6.5 MB each for SmolLM2 on XLA CPU) and memory mappings (about 300 each: a process has
65,530 by default), and sampler variants and shape buckets could otherwise add programs for as long as the
server runs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax


def shape_key(tree: Any) -> tuple:
    """Hashable (shape, dtype) signature of a pytree of arrays."""
    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


class ProgramCache:
    """Compiles each (key, input shapes) once; `compiles` counts real compilations (tests assert on it)."""

    def __init__(self, max_programs: int | None = None, compiler_options: dict[str, Any] | None = None) -> None:
        self.compiler_options = dict(compiler_options or {})  # XLA options for every program compiled here
        self._programs: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.max_programs = max_programs
        self.compiles = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._programs)

    def lookup(self, key: Hashable) -> Any:
        """The compiled program for key, or None if it is not compiled (yet, or any more)."""
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
            return program

    def get(self, key: Hashable, fn: Callable[..., Any], args: tuple, donate_argnums: tuple[int, ...] = ()) -> Any:
        """The compiled executable of fn for args' shapes (compiling it now if needed; the lock is not held
        while compiling, so lookups from other threads go on)."""
        program = self.lookup(key)
        if program is not None:
            return program
        lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
        program = lowered.compile(compiler_options=self.compiler_options or None)
        with self._lock:
            if key in self._programs:  # compiled meanwhile by another thread
                return self._programs[key]
            self._programs[key] = program
            self.compiles += 1
            if self.max_programs is not None and len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)
                self.evictions += 1
                # JAX's own caches still reference the evicted executable; without this its code stays mapped
                jax.clear_caches()
            return program
