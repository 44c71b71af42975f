"""Attention kernels behind one interface: blockwise prefill attention and paged decode attention.

Every function returns a normalised output with its log-sum-exp so partial results merge exactly.
The XLA reference path runs everywhere; accelerator kernels plug in behind the same signatures.
"""

from pallas_kernels.reference import (
    block_attention,
    merge_attention,
    merge_attention_many,
    paged_decode_attention,
    self_attention_term,
)

__all__ = [
    "block_attention",
    "merge_attention",
    "merge_attention_many",
    "paged_decode_attention",
    "self_attention_term",
]
