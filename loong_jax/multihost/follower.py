"""A follower process of a multi-host run: it holds its devices' instances and carries out the leader's
operations on groups that include them, in the leader's order, from one thread.

Every operation is read in order (so launches match on every process); an operation on a group without
this process's instances is skipped. A program's sampled rows go back to the leader once they are ready,
while the next operations are already read and launched. A heartbeat thread tells the leader this process
is alive and how far it has read.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from loong_jax.model.sampling import SamplerFlags, SamplerInputs
from loong_jax.multihost.channel import PeerTimeout, PlanChannel
from loong_jax.multihost.rows import local_rows
from loong_jax.runtime.programs import DecodeInputs, PrefillInputs

log = logging.getLogger("loong_jax")
BEAT_EVERY_S = 0.5
INPUTS = {"prefill": PrefillInputs, "decode": DecodeInputs}


class Follower:
    """Runs the leader's operations on a JaxExecutor's local instances until the leader says stop."""

    def __init__(self, executor: Any, channel: PlanChannel):
        self.executor = executor
        self.channel = channel
        self.done = -1  # the last operation read
        self.beats = 0
        self._bursts: dict[tuple[int, ...], tuple[int, Any]] = {}  # per group: its last decode (operation, pending)
        self._stop = threading.Event()

    def run(self) -> None:
        """Serve until a stop operation (returns) or the leader is gone (raises)."""
        beating = threading.Thread(target=self._beat, name="loong-heartbeat", daemon=True)
        beating.start()
        try:
            self._loop()
        finally:
            self._stop.set()
            beating.join()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.channel.beat({"n": self.beats, "done": self.done})
            except Exception as e:  # the leader (and its coordination service) is gone; the loop sees it too
                log.error("heartbeat failed: %s", e)
                return
            self.beats += 1
            self._stop.wait(BEAT_EVERY_S)

    def _loop(self) -> None:
        seq = 0
        in_flight: list[tuple[int, Any]] = []  # (operation, pending outputs) not answered yet
        while True:
            in_flight = [(s, p) for s, p in in_flight if not self._answer_if_ready(s, p)]
            if in_flight:
                op = self.channel.try_receive(seq)
                if op is None:
                    time.sleep(0.0005)
                    continue
            else:
                self.executor.poll_host()  # file the copies to the host tier that have arrived
                try:
                    op = self.channel.receive(seq)  # idle: wait for the leader
                except PeerTimeout:
                    continue
            self.done = seq
            if op["op"] == "stop":
                return
            pending = self._apply(seq, op)
            if pending is not None:
                in_flight.append((seq, pending))
            seq += 1

    def _apply(self, seq: int, op: dict) -> Any:
        """Carry out one operation if it concerns this process; a launched program's pending outputs."""
        ex = self.executor
        kind = op["op"]
        group = tuple(range(ex.instances.n)) if kind == "warmup" else tuple(op.get("group") or (op["src"], op["dst"]))
        if not ex.instances.has_local(group):
            return None
        try:
            if kind == "run":
                inp = INPUTS[op["kind"]](*op["inp"])
                carry = self._carry(group, op["after"]) if "after" in op else None
                flags, samp = SamplerFlags(*op["flags"]), SamplerInputs(*op["samp"])
                pending = ex.run_local(op["kind"], group, flags, inp, samp, carry)
                if op["kind"] == "decode":
                    self._bursts[group] = (seq, pending)
                return pending
            if kind == "save":  # not answered: slots whose copy fails are unreadable, and a load of them says so
                try:
                    ex.save_local(op["group"][0], op["pages"], op["slots"])
                except Exception as e:
                    log.warning("saving pages to the host tier failed (%s); they are dropped", e)
                    ex.host_store.lose(op["slots"])
                return None
            if kind == "migrate":
                ex.migrate_local(op["src"], op["dst"], np.asarray(op["src_slots"]), np.asarray(op["dst_slots"]))
                answer: dict = {"ok": True}
            elif kind == "load":
                for i, pages, slots in op["loads"]:
                    if ex.instances.local[i]:
                        ex.load_local(i, pages, slots)
                answer = {"ok": True}
            elif kind == "repair":
                answer = {"lost": ex.repair_local(group)}
            elif kind == "warmup":
                ex.warmup_local([(k, tuple(g), n, r, SamplerFlags(*f)) for k, g, n, r, f in op["jobs"]], show=False)
                answer = {"ok": True}
            else:
                raise ValueError(f"unknown operation {kind!r}")
        except Exception as e:
            log.exception("operation %d (%s) failed", seq, kind)
            answer = {"error": f"{type(e).__name__}: {e}"}
        self.channel.reply(seq, answer)
        return None

    def _carry(self, group: tuple[int, ...], after: int) -> Any:
        """This process's part of the state the decode burst `after` left (waiting for it to be dispatched if
        it was compiling): where a burst continuing it starts."""
        seq, pending = self._bursts.get(group, (None, None))
        if seq != after:
            raise ValueError(f"cannot continue decode operation {after}: it was not the last one on {list(group)}")
        if pending.carry is not None:
            return pending.carry
        return pending.future.result()[1]  # compiled on first use: its state once it is dispatched

    def _answer_if_ready(self, seq: int, pending: Any) -> bool:
        """Send a launched program's rows (or its error) once it has run; whether it was answered."""
        try:
            if not pending.ready():
                return False
            answer: dict = {"rows": {str(rank): fields for rank, fields in local_rows(pending.outputs()).items()}}
        except Exception as e:  # the program failed to compile or to run
            log.exception("operation %d failed while running", seq)
            answer = {"error": f"{type(e).__name__}: {e}"}
        self.channel.reply(seq, answer)
        return True
