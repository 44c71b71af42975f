"""Multi-host: one row of elastic instances over several processes on JAX's multi-controller runtime."""

from loong_jax.multihost.runtime import Distributed, initialize, shutdown

__all__ = ["Distributed", "initialize", "shutdown"]
