"""Process 0's side of a multi-host run: it sends the followers every operation on a group that includes
their instances, gathers their answers, and watches that they are alive.

Operations are numbered and every follower reads all of them in order, so every process launches the same
programs in the same order. A follower that stops sending heartbeats, or does not answer an operation
within the step deadline, is a `PeerLost`: the engine stops and answers every request with that error
(a lost process would otherwise hang every collective it takes part in).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from loong_jax.model.sampling import SamplerOutputs
from loong_jax.multihost.channel import PlanChannel
from loong_jax.multihost.rows import join_rows, local_rows
from loong_jax.runtime.work import FatalError

CHECK_EVERY_S = 0.25  # how often heartbeats are read


class PeerLost(FatalError):
    """A follower died or stopped answering: the run cannot go on."""


class Leader:
    """Numbered operations to the followers, their answers, and their heartbeats."""

    def __init__(
        self,
        channel: PlanChannel,
        owner: Sequence[int],
        *,
        heartbeat_timeout_s: float = 30.0,
        step_timeout_s: float = 300.0,
    ):
        """owner: the process of each instance. A follower is lost after heartbeat_timeout_s without a
        heartbeat, or when an operation it takes part in is not answered within step_timeout_s."""
        self.channel = channel
        self.owner = list(owner)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step_timeout_s = step_timeout_s
        self.followers = list(range(1, channel.num_processes))
        self.seq = 0
        self.lost: str | None = None  # why the run cannot go on, once it cannot
        now = time.monotonic()
        self._beats: dict[int, tuple[Any, float]] = {p: (None, now) for p in self.followers}
        self._checked = 0.0
        self._forgotten = 0  # operations below this number are deleted from the store
        self.send_s = 0.0  # time spent publishing operations
        self.reply_wait_s = 0.0  # time answers arrived after this process's own part was ready

    def processes(self, group: Sequence[int]) -> list[int]:
        """The followers holding instances of a group."""
        return sorted({self.owner[i] for i in group} - {0})

    def send(self, op: dict) -> int:
        """Publish the next operation (every follower reads it; those holding instances of its group act
        on it); returns its number."""
        t0 = time.perf_counter()
        self.check()
        seq = self.seq
        self.channel.publish(seq, op)
        self.seq += 1
        self.send_s += time.perf_counter() - t0
        return seq

    def gather(self, seq: int, kind: str, group: Sequence[int], local: Any) -> GatheredPending:
        """The pending outputs of operation seq: this process's part (None if it holds no instance of the
        group) and the followers' rows."""
        what = f"{kind} on instances {list(group)}"
        return GatheredPending(self, seq, what, len(group), local, self.processes(group))

    def answers(self, seq: int, group: Sequence[int], timeout_s: float | None = None) -> list[Any]:
        """Wait for the answers of the group's followers to operation seq (raises a follower's error)."""
        pending = GatheredPending(self, seq, f"operation {seq}", 0, None, self.processes(group), timeout_s)
        while not pending.ready():
            time.sleep(0.0005)
        pending.raise_errors()
        return list(pending.replies.values())

    def stop(self) -> None:
        """Tell the followers to leave their loops (when the leader shuts down)."""
        if self.lost is None:
            self.channel.publish(self.seq, {"op": "stop"})
            self.seq += 1

    def check(self) -> None:
        """Raise PeerLost if a follower's heartbeat is older than the timeout (read at most every
        CHECK_EVERY_S); drop operations every follower has read from the store."""
        if self.lost is not None:
            raise PeerLost(self.lost)
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return
        self._checked = now
        done = []
        for p in self.followers:
            beat = self.channel.last_beat(p)
            last, seen = self._beats[p]
            # before its first heartbeat a follower may still be loading: it gets the step deadline
            limit = self.heartbeat_timeout_s if last is not None else max(self.heartbeat_timeout_s, self.step_timeout_s)
            if beat is not None and beat != last:
                self._beats[p] = (beat, now)
            elif now - seen > limit:
                self.fail(f"process {p} is lost: no heartbeat for {now - seen:.1f}s")
            done.append(-1 if beat is None else int(beat["done"]))
        for seq in range(self._forgotten, min(done, default=-1) + 1):
            self.channel.forget_plan(seq)
        self._forgotten = max(self._forgotten, min(done, default=-1) + 1)

    def fail(self, why: str) -> None:
        self.lost = why
        raise PeerLost(why)


@dataclasses.dataclass(frozen=True)
class ChainedFrom:
    """A decode burst's start state spread over processes: the operation that leaves it, and the part on this
    process's devices (None where it holds none of the group)."""

    seq: int
    local: Any


class GatheredPending:
    """An operation's outputs gathered from this process (if it takes part) and the followers that do."""

    def __init__(
        self,
        leader: Leader,
        seq: int,
        what: str,
        ranks: int,
        local: Any,
        processes: list[int],
        timeout_s: float | None = None,
    ):
        self.leader, self.seq, self.what, self.ranks, self.local = leader, seq, what, ranks, local
        self.waiting = list(processes)
        self.replies: dict[int, Any] = {}
        self.deadline = time.monotonic() + (leader.step_timeout_s if timeout_s is None else timeout_s)
        self._local_ready: float | None = None
        self._done = False

    def ready(self) -> bool:
        """Whether every part is in; raises PeerLost if a follower is lost or misses the deadline."""
        if self._done:
            return True
        leader = self.leader
        leader.check()
        for p in list(self.waiting):
            reply = leader.channel.try_reply(self.seq, p)
            if reply is not None:
                self.replies[p] = reply
                self.waiting.remove(p)
                leader.channel.forget_reply(self.seq, p)
        now = time.monotonic()
        if self.waiting and now > self.deadline:
            leader.fail(
                f"process {self.waiting[0]} did not answer {self.what} within {leader.step_timeout_s:g}s "
                "(the step deadline)"
            )
        if self._local_ready is None and (self.local is None or self.local.ready()):
            self._local_ready = now
        if self._local_ready is None or self.waiting:
            return False
        leader.reply_wait_s += now - self._local_ready
        self._done = True
        return True

    @property
    def carry(self) -> ChainedFrom | None:
        """What a decode burst continuing this one starts from: this operation (each follower keeps its own
        part's state) and this process's part's state; None while this process's part is still compiling."""
        if self.local is not None and self.local.carry is None:
            return None
        return ChainedFrom(self.seq, None if self.local is None else self.local.carry)

    def raise_errors(self) -> None:
        for p, reply in self.replies.items():
            if "error" in reply:
                raise RuntimeError(f"process {p}: {reply['error']}")

    def result(self) -> SamplerOutputs:
        self.raise_errors()
        rows = local_rows(self.local.outputs()) if self.local is not None else {}
        for reply in self.replies.values():
            rows.update({int(rank): fields for rank, fields in reply["rows"].items()})
        return join_rows(rows, self.ranks)
