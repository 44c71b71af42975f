"""Prefix caching over the unified distributed KV pool."""

from loong_jax.prefix.cache import PrefixCache, PrefixStats

__all__ = ["PrefixCache", "PrefixStats"]
