"""Multi-host: one row of elastic instances over several processes on JAX's multi-controller runtime.

Joining a run (`runtime.py`), the plan channel over the coordination service (`channel.py`), the leader's
side (operations out, sampled rows and heartbeats in: `leader.py`, `rows.py`) and the follower loop
(`follower.py`). Beside the scheduling layer: imports the runtime and the model; the engine and the API
drive it.
"""

from loong_jax.multihost.runtime import Distributed, initialize, shutdown

__all__ = ["Distributed", "initialize", "shutdown"]
