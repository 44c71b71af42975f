"""What the Python API returns for each prompt."""

from __future__ import annotations

import dataclasses

from loong_jax.runtime.request import Request


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class RequestOutput:
    """One finished completion: text, tokens, why it stopped, usage and (if asked) logprobs."""

    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    time_to_first_token: float | None = None
    latency: float | None = None

    @classmethod
    def from_request(cls, r: Request) -> RequestOutput:
        want = r.params.logprobs is not None
        return cls(
            request_id=r.rid,
            prompt_token_ids=list(r.prompt_ids),
            text=r.text,
            token_ids=list(r.output_ids),
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            usage=Usage(len(r.prompt_ids), len(r.output_ids), r.cached_tokens),
            logprobs=list(r.logprobs) if want else None,
            top_logprobs=[dict(t) for t in r.top_logprobs] if want else None,
            time_to_first_token=None if r.first_token_time is None else r.first_token_time - r.arrival,
            latency=None if r.finish_time is None else r.finish_time - r.arrival,
        )
