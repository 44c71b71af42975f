"""What ran where, and when: one span per launch (a prefill, a decode step, a migration).

A span also says how the layout changed: the instances that kept a prefill's K/V (fewer than ran it: a
scale-down) and the instances that became the master of a decoding request whose K/V they held none of (a
scale-up). The engine fills a `Timeline` when asked to (`Engine.record_timeline`); the simulator always
can; `benchmarks/timeline.py` draws one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class Span:
    """One launch on the timeline, in the executor's clock (seconds)."""

    kind: str  # "prefill", "decode" or "migrate"
    group: tuple[int, ...]  # the instances it ran on (a migration: source and destination)
    start: float
    end: float | None = None  # None while it runs
    requests: int = 0
    tokens: int = 0  # tokens computed (prefill), sampled (decode) or moved (migration)
    kept: tuple[int, ...] = ()  # prefill: the instances that keep some of its K/V
    scaled_up: tuple[int, ...] = ()  # decode: instances that took a request whose K/V they held none of
    failed: bool = False

    @property
    def scale_down(self) -> bool:
        """A prefill whose K/V stays on fewer instances than ran it."""
        return self.kind == "prefill" and 0 < len(self.kept) < len(self.group)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Span:
        d = dict(d)
        for key in ("group", "kept", "scaled_up"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)


class Timeline:
    """The spans of the last `limit` launches, oldest first (older ones are dropped: memory stays bounded)."""

    def __init__(self, limit: int = 200_000):
        if limit < 1:
            raise ValueError(f"a timeline keeps at least one span, got limit={limit}")
        self.spans: collections.deque[Span] = collections.deque(maxlen=limit)

    def add(self, span: Span) -> Span:
        self.spans.append(span)
        return span

    def save(self, path: str | Path, **meta: object) -> None:
        """Write the spans (and any metadata, such as the number of instances) as JSON."""
        Path(path).write_text(json.dumps({**meta, "spans": [s.to_json() for s in self.spans]}))

    @staticmethod
    def load(path: str | Path) -> tuple[list[Span], dict]:
        """The spans and the metadata of a saved timeline."""
        data = json.loads(Path(path).read_text())
        spans = [Span.from_json(s) for s in data.pop("spans")]
        return spans, data
