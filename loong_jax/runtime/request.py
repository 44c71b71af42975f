"""A request's host-side life: prompt, sampled tokens, incremental text, stop conditions and timings."""

from __future__ import annotations

import bisect
import dataclasses
import enum
import time
from typing import Any, Protocol

from loong_jax.model.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer(Protocol):
    """Turns a request's tokens into text, one token at a time (the engine supplies one per request)."""

    def push(self, token_id: int) -> str: ...


class TokenMatcher(Protocol):
    """A structured output's grammar state (the engine supplies one per constrained request)."""

    def fill(self, row: Any) -> None: ...  # write the allowed next tokens into a bitmask row

    def consume(self, token: int) -> None: ...  # follow a sampled token (ValueError if the grammar refuses it)


@dataclasses.dataclass
class Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    seed: int
    eos_ids: tuple[int, ...]
    detok: Detokenizer | None = None
    matcher: TokenMatcher | None = None  # a structured output's grammar: the sampler's mask, fed what is sampled
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why the engine failed it (finish_reason "error")
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    reserved_pages: int = 0
    expected_new_tokens: int = 0  # new tokens admission plans for (default: max_new_tokens)
    priority: int = 0  # higher is dispatched first
    prefilled: int = 0  # tokens of its prefill whose KV is computed or being computed
    prefill_len: int = 0  # tokens its prefill computes, fixed when it is dispatched
    prefill_group: tuple[int, ...] = ()  # instances its last prefill pass ran on (a chunked prompt goes on there)
    preemptions: int = 0  # times its KV was dropped to be recomputed
    skipped: int = 0  # times later requests were dispatched ahead of it
    cached_tokens: int = 0  # tokens of its prefill whose K/V came from the prefix cache
    page_keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its full pages so far
    _emitted_text: int = 0
    _token_ends: list[int] = dataclasses.field(default_factory=list)  # len(text) once each token was added
    _cut: int | None = None  # where a stop string cut the text (tokens starting at or after it are not shown)
    _released: int = 0  # tokens handed out by take_tokens
    _stop_checked: int = 0
    _stop_floor: int = 0  # stop strings only count from here: the text of the first min_tokens tokens is exempt

    def __post_init__(self) -> None:
        self.expected_new_tokens = self.expected_new_tokens or self.max_new_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V exist or are being computed: the prompt and all sampled tokens but the last."""
        return len(self.prompt_ids) + max(0, len(self.output_ids) - 1)

    @property
    def prefill_ids(self) -> list[int]:
        """Tokens a prefill computes: the prompt, plus the tokens sampled so far when it is recomputed."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def num_prefill_tokens(self) -> int:
        """len(prefill_ids), without building the list."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_done(self) -> bool:
        return self.prefill_len > 0 and self.prefilled >= self.prefill_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, logprob: float, top: list[tuple[int, float]], now: float | None = None) -> None:
        """Record one sampled token and apply the stop rules (EOS, stop ids, stop strings, length)."""
        now = time.monotonic() if now is None else now
        if self.matcher is not None:
            try:
                self.matcher.consume(token)
            except ValueError as e:  # the mask rules this out: a fault, not the client's
                self.error = str(e)
                self._finish("error", now)
                return
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top)
        p = self.params
        is_eos = token in self.eos_ids and not p.ignore_eos
        stop_id = token in p.stop_token_ids
        if (is_eos or stop_id) and len(self.output_ids) > p.min_tokens:
            self._token_ends.append(len(self.text))
            self.stop_reason = None if is_eos else token
            self._finish("stop", now)
            return
        if self.detok is not None:
            self.text += self.detok.push(token)
        self._token_ends.append(len(self.text))
        if self.detok is not None:
            if len(self.output_ids) <= p.min_tokens:
                self._stop_floor = self._stop_checked = len(self.text)
            elif p.stop and self._check_stop_strings():
                self._finish("stop", now)
                return
        if not self.finished and len(self.output_ids) >= self.max_new_tokens:
            self._finish("length", now)

    def _check_stop_strings(self) -> bool:
        start = max(self._stop_floor, self._stop_checked - max(len(s) for s in self.params.stop) + 1)
        self._stop_checked = len(self.text)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self._cut = len(self.text)
        self.stop_reason = s
        return True

    def _finish(self, reason: str, now: float) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = now

    def take_text_delta(self) -> str:
        """Text produced since the last call; holds back a possible partial stop string while running."""
        limit = len(self.text)
        if not self.finished and self.params.stop and len(self.output_ids) > self.params.min_tokens:
            hold = max(len(s) for s in self.params.stop) - 1
            limit = max(self._emitted_text, self._stop_floor, limit - hold)
        delta = self.text[self._emitted_text : limit]
        self._emitted_text = limit
        return delta

    def take_tokens(self) -> range:
        """Indices of the sampled tokens to show since the last call, after take_text_delta: those whose text
        has been handed out. When a stop string cut the text, tokens starting at or after the cut are never
        shown (the last token shown may run past the cut when the stop string begins inside it)."""
        if self.finished and self._cut is None:
            upto = len(self.output_ids)
        elif self.finished:
            upto = bisect.bisect_left(self._token_ends, self._cut) + 1 if self._cut else 0
            upto = min(upto, len(self.output_ids))
        else:
            upto = bisect.bisect_right(self._token_ends, self._emitted_text)
        upto = max(upto, self._released)
        shown = range(self._released, upto)
        self._released = upto
        return shown

    def token_start(self, index: int) -> int:
        """Where the index-th sampled token's text starts in `text`."""
        return self._token_ends[index - 1] if index > 0 else 0


def queue_order(req: Request) -> tuple[int, float, int]:
    """The order requests are served in: higher priority first, then earlier arrival."""
    return -req.priority, req.arrival, req.rid
