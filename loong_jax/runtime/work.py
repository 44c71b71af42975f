"""The executor interface the engine loop drives, shared by the JAX executor and the simulated one.

An executor launches one group's program at a time and returns at once with a `Launch`; the engine keeps
launches in flight on disjoint instances, asks which are done, and applies their sampled tokens. Time is
the executor's: wall-clock for real programs, a virtual clock for the simulator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from loong_jax.model.sampling import SamplerOutputs
from loong_jax.runtime.instances import Group
from loong_jax.runtime.kv_pool import PagePool
from loong_jax.runtime.request import Request
from loong_jax.runtime.timeline import Span


class FatalError(RuntimeError):
    """The engine cannot go on (a process of a multi-host run is lost): not one launch's failure but every
    request's; the engine stops and answers them all with this error."""


class Pending(Protocol):
    """The outputs of a dispatched program."""

    def ready(self) -> bool: ...

    def result(self) -> SamplerOutputs: ...


@dataclasses.dataclass(frozen=True)
class Migration:
    """Move the last `tokens` tokens of a request's KV from instance src to instance dst."""

    rid: int
    src: int
    dst: int
    tokens: int


@dataclasses.dataclass
class DecodeWork:
    """A burst of `steps` decode steps of a group (one launch): a master (group rank) per request, where its
    new tokens' K/V goes. A request stops inside the burst at a stop token or its max_tokens."""

    group: Group
    requests: list[Request]
    masters: list[int]
    steps: int = 1


@dataclasses.dataclass
class PrefillWork:
    """One striped ring prefill of a group; plans[i][t] is the group rank that keeps request i's token t.

    `chunk`: tokens of each request to compute in this pass, continuing where its last chunk ended (the
    pass attends to the K/V the earlier chunks left in the group's pools: an appending prefill; the group
    must include every instance holding them). `piggyback` decodes fused in: simulated executor only (the
    chunked-prefill baseline).
    """

    group: Group
    requests: list[Request]
    plans: list[np.ndarray]
    chunk: list[int] | None = None
    piggyback: DecodeWork | None = None


@dataclasses.dataclass
class Iteration:
    """What to start now on free instances: preemptions and migrations first, then prefills and decodes."""

    prefills: list[PrefillWork] = dataclasses.field(default_factory=list)
    decodes: list[DecodeWork] = dataclasses.field(default_factory=list)
    migrations: list[Migration] = dataclasses.field(default_factory=list)
    preempt: list[Request] = dataclasses.field(default_factory=list)  # running requests to recompute later

    def instances(self) -> list[int]:
        moved = [i for m in self.migrations for i in (m.src, m.dst)]
        return [i for w in [*self.prefills, *self.decodes] for i in w.group] + moved


@dataclasses.dataclass
class Launch:
    """One program in flight: its kind, the instances it occupies, and who samples what."""

    kind: str  # "prefill", "decode" or "migrate"
    group: Group
    ranks: list[list[Request]]  # per rank: the requests it samples, in row order (none for migrations)
    pending: Pending
    requests: list[Request] = dataclasses.field(default_factory=list)  # every request the program touches
    span: Span | None = None  # its entry on the engine's timeline, when one is recorded
    work: DecodeWork | None = None  # a decode's work (a burst continuing it repeats it)
    reserved: dict[int, int] = dataclasses.field(default_factory=dict)  # a decode's slots reserved per request
    follows: Launch | None = None  # the burst this one continues (dispatched before that one was read)
    successor: Launch | None = None  # the burst continuing this one
    collected: bool = False  # its results were applied
    started: float | None = None  # a decode's start on the engine's clock (a chained one's: its predecessor's end)


class Executor(Protocol):
    """Runs group programs; pools are the host allocators of the group's instances, in group order."""

    def now(self) -> float: ...

    def prefill(self, work: PrefillWork, pools: Sequence[PagePool]) -> Launch: ...

    def decode(self, work: DecodeWork, pools: Sequence[PagePool], after: Launch | None = None) -> Launch:
        """A decode burst; after: a burst of the same work still in flight that this one continues from the
        state it leaves on the devices (only where `can_chain`)."""
        ...

    def can_chain(self, group: Group) -> bool:
        """Whether a decode burst on the group can be dispatched to continue one still in flight."""
        ...

    def migrate(self, src: int, dst: int, src_slots: np.ndarray, dst_slots: np.ndarray) -> Launch: ...

    def wait(self, launches: Sequence[Launch], timeout: float | None) -> None:
        """Return when one of the launches is ready, or after `timeout` seconds of this executor's clock."""
        ...

    def repair(self, group: Group) -> list[int]:
        """After a program of the group failed: give empty KV pools to the instances whose pools it left
        unusable, and return those instances (the KV they held is lost)."""
        ...

    # The prefix cache's host tier (see loong_jax/prefix/host_tier.py). before_write, when set, is called
    # with a group right before a program that may overwrite its pools' pages is dispatched.
    before_write: Callable[[Group], None] | None

    def save_pages(self, instance: int, pages: Sequence[int], slots: Sequence[int]) -> Any:
        """Copy whole pages of an instance's pool into slots of its host tier's store (not waited for)."""
        ...

    def load_pages(self, loads: dict[int, tuple[list[int], list[int]]]) -> Any:
        """Write host tier slots into whole pages of instances' pools, {instance: (pages, slots)} (dispatched,
        not waited for)."""
        ...

    def can_load(self, instance: int) -> bool:
        """Whether load_pages may write into the instance's pool while programs run on it."""
        ...

    def poll_host(self) -> None:
        """File copies to the host tier that have arrived."""
        ...

    def when_ready(self, x: Any, done: Callable[[], None]) -> None:
        """Call done() once x (what load_pages returned) is computed."""
        ...
