"""One host-to-device transfer per launch: a program's per-rank input arrays (about twenty small ones for
a decode: tokens, positions, slots, page tables, sampler parameters) travel as one buffer of 32-bit words
[d, N], split again inside the program at static offsets (free: slices and bitcasts). Each separate
transfer costs the host tens of microseconds in JAX's dispatch, more than the arrays' bytes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Layout = tuple[Any, tuple[tuple[tuple[int, ...], np.dtype], ...]]  # (tree structure, (shape, dtype) per leaf)
WORD = np.dtype(np.uint32)


def layout(tree: Any) -> Layout:
    """The static description of a pytree of host arrays that `unpack` needs (hashable)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, x.dtype) for x in leaves)


def pack(tree: Any) -> np.ndarray:
    """Every leaf [d, ...] (4-byte or bool dtypes) flattened per rank and laid side by side: [d, N] words."""
    leaves = jax.tree.leaves(tree)
    d = leaves[0].shape[0]
    parts = []
    for x in leaves:
        x = np.asarray(x)
        if x.dtype == np.bool_:
            x = x.astype(np.uint32)
        if x.dtype.itemsize != 4:
            raise TypeError(f"only 4-byte and bool arrays are packed, got {x.dtype}")
        parts.append(np.ascontiguousarray(x).reshape(d, -1).view(WORD))
    return np.concatenate(parts, axis=1)


def unpack(words: jnp.ndarray, spec: Layout) -> Any:
    """Inside a program: the pytree `pack` packed, from its words [d, N]."""
    treedef, leaves = spec
    out, at = [], 0
    for shape, dtype in leaves:
        n = int(np.prod(shape[1:], dtype=np.int64))
        part = words[:, at : at + n].reshape(shape)
        at += n
        if dtype == np.bool_:
            out.append(part != 0)
        elif dtype == WORD:
            out.append(part)
        else:
            out.append(jax.lax.bitcast_convert_type(part, dtype))
    return jax.tree.unflatten(treedef, out)


def pack_device(tree: Any) -> jnp.ndarray:
    """Inside a program: `pack` of device arrays (the words a later program unpacks with the same layout)."""
    parts = []
    for x in jax.tree.leaves(tree):
        x = x.astype(WORD) if x.dtype == jnp.bool_ else x
        x = x.reshape(x.shape[0], -1)
        parts.append(x if x.dtype == WORD else jax.lax.bitcast_convert_type(x, WORD))
    return jnp.concatenate(parts, axis=1)


def run_packed(fn: Callable[..., Any], spec: Layout, params: Any, pools: Any, words: jnp.ndarray) -> Any:
    """fn(params, pools, *inputs) with its inputs given as one packed buffer."""
    return fn(params, pools, *unpack(words, spec))


def run_packed_decode(
    fn: Callable[..., Any], spec: Layout, params: Any, pools: Any, words: jnp.ndarray, prev: jnp.ndarray
) -> tuple[Any, Any, jnp.ndarray]:
    """A decode program on packed inputs: rows' tokens, liveness and sampler state come from `prev` (the
    words a burst of the same rows left, or these very words for a burst that continues none), the rest
    from `words`; returns its outputs, the pools and the words the next burst may continue from."""
    inp, samp = unpack(words, spec)
    was, was_samp = unpack(prev, spec)
    out, pools, carry = fn(params, pools, inp._replace(tokens=was.tokens, live=was.live), was_samp)
    return out, pools, pack_device((inp._replace(tokens=carry.tokens, live=carry.live), carry.samp))


def packed_program(fn: Callable[..., Any], spec: Layout, kind: str = "prefill") -> functools.partial:
    """fn(params, pools, *inputs) as a program of (params, pools, words), or for a decode of (params, pools,
    words, prev) (see `run_packed_decode`)."""
    return functools.partial(run_packed_decode if kind == "decode" else run_packed, fn, spec)
