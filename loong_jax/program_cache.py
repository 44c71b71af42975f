"""Ahead-of-time compiled programs keyed by kind, static options and input shapes, with a compile counter.

The cache holds at most `max_programs` programs (least recently used out first): a compiled program costs
host memory (about 6.5 MB each for SmolLM2 on XLA CPU), and sampler variants and shape buckets could
otherwise add programs for as long as the server runs."""

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

    def __init__(self, max_programs: int | None = None) -> None:
        self._programs: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.max_programs = max_programs
        self.compiles = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._programs)

    def get(self, key: Hashable, fn: Callable[..., Any], args: tuple, donate_argnums: tuple[int, ...] = ()) -> Any:
        """The compiled executable of fn for args' shapes (compiling it now if needed)."""
        with self._lock:
            program = self._programs.get(key)
            if program is None:
                program = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
                self._programs[key] = program
                self.compiles += 1
                if self.max_programs is not None and len(self._programs) > self.max_programs:
                    self._programs.popitem(last=False)
                    self.evictions += 1
            else:
                self._programs.move_to_end(key)
            return program
