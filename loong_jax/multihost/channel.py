"""The leader's per-step messages to the followers and their replies, over the coordination service's
key-value store: control data only (a step's host-side inputs, sampled tokens), never KV or weights.

Messages are numbered; a follower reads them in order, so every process launches the same programs in the
same order (a mismatch would hang the collectives). Waiting has a deadline: a peer that stops answering is
a `PeerTimeout` naming it, not a hang. Payloads are trees of dicts, lists, numbers, strings and numpy
arrays, encoded as a JSON header plus the arrays' raw bytes (nothing is unpickled).
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np

PREFIX = "loong"


class PeerTimeout(TimeoutError):
    """A peer did not send what was expected within the deadline."""


def encode(tree: Any) -> bytes:
    """Bytes of a tree of dicts (string keys), lists, tuples, numbers, strings, None and numpy arrays."""
    arrays: list[np.ndarray] = []

    def walk(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {"__array__": len(arrays) - 1, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, dict):
            return {"__dict__": {str(k): walk(v) for k, v in x.items()}}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot send a {type(x).__name__} between processes")

    header = json.dumps(walk(tree)).encode()
    out = io.BytesIO()
    out.write(struct.pack("<II", len(header), len(arrays)))
    out.write(header)
    for a in arrays:
        out.write(struct.pack("<Q", a.nbytes))
        out.write(a.tobytes())
    return out.getvalue()


def decode(data: bytes) -> Any:
    """The tree `encode` was given (tuples come back as lists)."""
    header_len, count = struct.unpack_from("<II", data, 0)
    at = 8 + header_len
    header = json.loads(data[8:at])
    buffers = []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", data, at)
        buffers.append(data[at + 8 : at + 8 + n])
        at += 8 + n

    def walk(x: Any) -> Any:
        if isinstance(x, dict) and "__array__" in x:
            return np.frombuffer(buffers[x["__array__"]], dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x["__dict__"].items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(header)


class PlanChannel:
    """Numbered messages from process 0 to all others, and each one's reply to a message."""

    def __init__(self, client: Any, process_id: int, num_processes: int, timeout_s: float = 30.0):
        self.client = client  # the coordination service client (jax.distributed's)
        self.process_id = process_id
        self.num_processes = num_processes
        self.timeout_ms = int(timeout_s * 1000)

    @classmethod
    def from_jax(cls, timeout_s: float = 30.0) -> PlanChannel:
        """The channel of the run `loong_jax.multihost.initialize` joined."""
        import jax  # noqa: PLC0415
        from jax._src import distributed  # noqa: PLC0415 (the client has no public accessor)

        if distributed.global_state.client is None:
            raise RuntimeError("not a multi-host run: call loong_jax.multihost.initialize first")
        return cls(distributed.global_state.client, jax.process_index(), jax.process_count(), timeout_s)

    def publish(self, seq: int, message: Any) -> None:
        """Leader: message number seq, for every follower."""
        self.client.key_value_set_bytes(f"{PREFIX}/plan/{seq}", encode(message))

    def receive(self, seq: int) -> Any:
        """Follower: message number seq (waits for it, up to the deadline)."""
        return decode(self._get(f"{PREFIX}/plan/{seq}", "process 0 (the leader)"))

    def reply(self, seq: int, message: Any) -> None:
        """Follower: its answer to message seq."""
        self.client.key_value_set_bytes(f"{PREFIX}/reply/{seq}/{self.process_id}", encode(message))

    def replies(self, seq: int) -> list[Any]:
        """Leader: every follower's answer to message seq, by process id (1, 2, ...); waits."""
        return [decode(self._get(f"{PREFIX}/reply/{seq}/{p}", f"process {p}")) for p in range(1, self.num_processes)]

    def try_reply(self, seq: int, process: int) -> Any | None:
        """Leader: a follower's answer to message seq if it is there, else None (does not wait)."""
        data = self._try_get(f"{PREFIX}/reply/{seq}/{process}")
        return None if data is None else decode(data)

    def forget_plan(self, seq: int) -> None:
        """Leader: drop message seq from the store (once every follower has read it)."""
        self.client.key_value_delete(f"{PREFIX}/plan/{seq}")

    def try_receive(self, seq: int) -> Any | None:
        """Follower: message number seq if it is there, else None (does not wait)."""
        data = self._try_get(f"{PREFIX}/plan/{seq}")
        return None if data is None else decode(data)

    def forget_reply(self, seq: int, process: int) -> None:
        self.client.key_value_delete(f"{PREFIX}/reply/{seq}/{process}")

    def forget(self, seq: int) -> None:
        """Leader: drop message seq and its replies from the store (once every follower has answered it)."""
        self.client.key_value_delete(f"{PREFIX}/plan/{seq}")
        for p in range(1, self.num_processes):
            self.client.key_value_delete(f"{PREFIX}/reply/{seq}/{p}")

    def beat(self, message: Any) -> None:
        """Follower: its heartbeat (the latest replaces the one before)."""
        self.client.key_value_set_bytes(f"{PREFIX}/alive/{self.process_id}", encode(message), allow_overwrite=True)

    def last_beat(self, process: int) -> Any | None:
        """Leader: a follower's latest heartbeat, None before its first."""
        data = self._try_get(f"{PREFIX}/alive/{process}")
        return None if data is None else decode(data)

    def agree_min(self, name: str, value: int) -> int:
        """Every process: the smallest of the values every process gives under this name (waits for all)."""
        self.client.key_value_set_bytes(f"{PREFIX}/agree/{name}/{self.process_id}", encode(int(value)))
        keys = [f"{PREFIX}/agree/{name}/{p}" for p in range(self.num_processes)]
        return min(int(decode(self._get(k, f"process {k.rsplit('/', 1)[1]}"))) for k in keys)

    def check_same(self, name: str, value: str) -> None:
        """Every process: raise ValueError unless every process gives the same value under this name."""
        self.client.key_value_set_bytes(f"{PREFIX}/same/{name}/{self.process_id}", encode(value))
        values = [decode(self._get(f"{PREFIX}/same/{name}/{p}", f"process {p}")) for p in range(self.num_processes)]
        differ = [p for p, v in enumerate(values) if v != values[0]]
        if differ:
            raise ValueError(
                f"process {differ[0]} has a different {name} than process 0: {values[differ[0]]!r} vs {values[0]!r}"
            )

    def _try_get(self, key: str) -> bytes | None:
        try:
            return self.client.key_value_try_get_bytes(key)
        except Exception as e:  # the client raises its own error type
            if "NOT_FOUND" in str(e):
                return None
            raise

    def _get(self, key: str, who: str) -> bytes:
        try:
            return self.client.blocking_key_value_get_bytes(key, self.timeout_ms)
        except Exception as e:  # the client raises its own error type on a deadline
            if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                raise PeerTimeout(f"{who} sent nothing for {key} within {self.timeout_ms / 1000:g}s") from None
            raise
