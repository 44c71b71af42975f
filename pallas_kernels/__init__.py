"""Attention kernels behind one interface: blockwise prefill attention, attention to held K/V (an appending
prefill) and paged decode attention.

Every function returns a normalised output with its log-sum-exp so partial results merge exactly. Two
backends implement the interface: the XLA reference (`reference.py`, runs everywhere) and Pallas kernels
with the Triton lowering (`ring_attention.py`, `paged_decode.py`: A100 and H100/H200; interpret mode on
CPU). `attention_backend` picks one; the programs take the pair of functions it returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from pallas_kernels import paged_decode, ring_attention
from pallas_kernels.reference import (
    block_attention,
    held_attention,
    merge_attention,
    merge_attention_many,
    paged_decode_attention,
)

BACKENDS = ("auto", "xla", "pallas")


class AttentionBackend(NamedTuple):
    """The attention primitives of one backend (same signatures as the reference's)."""

    name: str  # "xla", "pallas" or "pallas (interpret)"
    block_attention: Callable
    held_attention: Callable
    paged_decode_attention: Callable


def attention_backend(name: str = "auto", platform: str = "cpu") -> AttentionBackend:
    """The backend for devices of `platform`: "auto" is Pallas on GPU and XLA elsewhere; "pallas" off a GPU
    runs the kernels in interpret mode (slow: for tests and to see them run)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "xla" or (name == "auto" and platform != "gpu"):
        return AttentionBackend("xla", block_attention, held_attention, paged_decode_attention)
    interpret = platform != "gpu"
    return AttentionBackend(
        "pallas (interpret)" if interpret else "pallas",
        functools.partial(ring_attention.block_attention, interpret=interpret),
        functools.partial(ring_attention.held_attention, interpret=interpret),
        functools.partial(paged_decode.paged_decode_attention, interpret=interpret),
    )


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "attention_backend",
    "block_attention",
    "held_attention",
    "merge_attention",
    "merge_attention_many",
    "paged_decode_attention",
]
