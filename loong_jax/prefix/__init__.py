"""Prefix caching over the unified distributed KV pool: page keys chained over the tokens, lookup over
every instance's pool, sharing at prefill start, publishing and least-recently-released eviction; and a
host-memory tier that keeps evicted pages and loads them back on a hit.

Beside the scheduling layer: imports the runtime and the model; the engine drives it.
"""

from loong_jax.prefix.cache import PrefixCache, PrefixStats
from loong_jax.prefix.host_tier import HostTier, HostTierStats

__all__ = ["HostTier", "HostTierStats", "PrefixCache", "PrefixStats"]
