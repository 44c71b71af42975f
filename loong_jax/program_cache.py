"""Ahead-of-time compiled programs keyed by kind, static options and input shapes, with a compile counter."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import jax


def shape_key(tree: Any) -> tuple:
    """Hashable (shape, dtype) signature of a pytree of arrays."""
    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


class ProgramCache:
    """Compiles each (key, input shapes) once; `compiles` counts real compilations (tests assert on it)."""

    def __init__(self) -> None:
        self._programs: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.compiles = 0

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
            return program
