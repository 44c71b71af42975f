"""Prefix caching over the unified distributed KV pool: page keys chained over the tokens, lookup over
every instance's pool, sharing at prefill start, publishing and least-recently-released eviction.

Beside the scheduling layer: imports the runtime and the model; the engine drives it.
"""

from loong_jax.prefix.cache import PrefixCache, PrefixStats

__all__ = ["PrefixCache", "PrefixStats"]
