"""Joining the processes of a multi-host run: who coordinates, how many processes, which one this is.

Every process runs the same command; process 0 is the coordinator (JAX's coordination service) and each
process owns its local devices' instances. The settings come from arguments or from the environment
(LOONG_COORDINATOR=HOST:PORT, LOONG_NUM_PROCESSES, LOONG_PROCESS_ID). On CPU the collectives between
processes run over gloo (loopback or the network); on GPU over NCCL.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping

import jax

from loong_jax.runtime.platform import use_virtual_cpu_devices

ENV = ("LOONG_COORDINATOR", "LOONG_NUM_PROCESSES", "LOONG_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where the coordinator listens, how many processes take part and which one this is."""

    coordinator: str  # HOST:PORT of process 0
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator must be HOST:PORT with a port in [1, 65535], got {self.coordinator!r}")
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes - 1}], got {self.process_id}")

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Distributed | None:
        """The settings from LOONG_COORDINATOR, LOONG_NUM_PROCESSES and LOONG_PROCESS_ID; None if none is set."""
        env = os.environ if env is None else env
        given = [name for name in ENV if env.get(name)]
        if not given:
            return None
        if len(given) < len(ENV):
            missing = ", ".join(name for name in ENV if name not in given)
            raise ValueError(f"a multi-host run needs all of {', '.join(ENV)}; missing {missing}")
        try:
            num, pid = int(env["LOONG_NUM_PROCESSES"]), int(env["LOONG_PROCESS_ID"])
        except ValueError as e:
            raise ValueError(f"LOONG_NUM_PROCESSES and LOONG_PROCESS_ID must be integers: {e}") from None
        return cls(env["LOONG_COORDINATOR"], num, pid)


def initialize(dist: Distributed, *, local_cpu_devices: int | None = None, timeout_s: int = 120) -> None:
    """Join the run: call before JAX creates any array. local_cpu_devices: virtual CPU devices of this
    process (CPU runs and tests). A coordinator or peer that does not answer within timeout_s is an error,
    not a hang."""
    if local_cpu_devices is not None:
        use_virtual_cpu_devices(local_cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A process that dies must not take the others down with it (JAX's default): the leader then answers
    # every request with the error and reports the lost process (loong_jax.multihost.leader).
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(dist.coordinator, dist.num_processes, dist.process_id, initialization_timeout=timeout_s)


def shutdown(timeout_s: float = 30.0) -> None:
    """Leave the run in order: followers disconnect first, and process 0, whose process hosts the
    coordination service, waits (up to timeout_s) until they have, so that no follower loses the service
    while it disconnects (JAX aborts such a process)."""
    from jax._src import distributed  # noqa: PLC0415 (the client has no public accessor)

    client = distributed.global_state.client
    if client is None:
        return
    if jax.process_index() == 0:
        # returns once every other process is gone (a follower that disconnected is no longer alive)
        waiting = threading.Thread(target=client.get_live_nodes, args=(list(range(jax.process_count())),), daemon=True)
        waiting.start()
        waiting.join(timeout_s)
    jax.distributed.shutdown()
