"""Host-side batch helpers: shape buckets and the per-row sampler arrays of a batch of requests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loong_jax.model.sampling import (
    MAX_BANNED,
    MAX_EOS_IDS,
    MAX_LOGIT_BIAS,
    SamplerFlags,
    SamplerInputs,
    mask_words,
    seed_words,
)
from loong_jax.runtime.request import Request


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the shape a batch of n rows is padded to."""
    n = int(max(n, minimum, 1))
    return 1 << (n - 1).bit_length()


def prefill_rows(tokens: int, min_tokens: int, max_rows: int) -> int:
    """Sampled rows per rank of a prefill whose ranks hold `tokens` tokens: one per `min_tokens`, capped.

    Tying rows to the token bucket keeps one program per token bucket (fewer programs to warm up); a
    batch with more requests per rank than that is padded to a larger token bucket instead.
    """
    return max(1, min(tokens // min_tokens, bucket(max_rows)))


def sampler_flags(reqs: Sequence[Request]) -> SamplerFlags:
    """The sampler variant a batch needs: extras if any request uses penalties, bias or logprobs; sample if
    any samples (temperature > 0); else greedy."""
    extras = any(r.params.uses_extras for r in reqs)
    return SamplerFlags(sample=extras or any(r.params.temperature > 0 for r in reqs), extras=extras)


def sampler_inputs(
    ranks: Sequence[Sequence[Request]],
    rows: int,
    flags: SamplerFlags,
    penalty_len: int | None = None,
    vocab_size: int = 0,
) -> SamplerInputs:
    """Sampler arrays [d, rows, ...] for the requests each rank samples (padding rows are greedy). With
    extras, the prompt and output ids for penalties span penalty_len tokens (fixed by the executor, so that
    one program serves every length; default: the batch's longest, bucketed), and with a vocab_size each row
    has a token bitmask: its grammar's next tokens for a structured output (its matcher fills it now)."""
    reqs = [r for rank in ranks for r in rank]
    d = len(ranks)
    if not flags.extras:
        lp = lo = 0
    elif penalty_len is not None:
        lp = lo = penalty_len
    else:
        lp = bucket(max((len(r.prompt_ids) for r in reqs), default=1), 16)
        lo = bucket(max((len(r.output_ids) for r in reqs), default=1), 16)
    f32 = lambda fill: np.full((d, rows), fill, np.float32)  # noqa: E731
    temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
    rep, freq, pres = f32(1.0), f32(0.0), f32(0.0)
    top_k, step = np.zeros((d, rows), np.int32), np.zeros((d, rows), np.int32)
    seed = np.zeros((d, rows, 2), np.uint32)
    stop_ids = np.full((d, rows, MAX_BANNED), -1, np.int32)
    min_left = np.zeros((d, rows), np.int32)
    prompt_ids = np.full((d, rows, lp), -1, np.int32)
    output_ids = np.full((d, rows, lo), -1, np.int32)
    nb = MAX_LOGIT_BIAS if flags.extras else 0
    bias_ids, bias = np.full((d, rows, nb), -1, np.int32), np.zeros((d, rows, nb), np.float32)
    allowed = np.full((d, rows, mask_words(vocab_size) if flags.extras else 0), -1, np.int32)
    for k, rank in enumerate(ranks):
        for i, r in enumerate(rank):
            p = r.params
            temperature[k, i], top_p[k, i], min_p[k, i] = p.temperature, p.top_p, p.min_p
            top_k[k, i] = max(p.top_k, 0)
            rep[k, i], freq[k, i], pres[k, i] = p.repetition_penalty, p.frequency_penalty, p.presence_penalty
            seed[k, i] = seed_words(r.seed)
            step[k, i] = len(r.output_ids)
            ends = [*(() if p.ignore_eos else r.eos_ids[:MAX_EOS_IDS]), *p.stop_token_ids][:MAX_BANNED]
            stop_ids[k, i, : len(ends)] = ends
            min_left[k, i] = p.min_tokens - len(r.output_ids)  # > 0: neither EOS nor a stop token may end it yet
            if flags.extras and p.logit_bias:
                bias_ids[k, i, : len(p.logit_bias)] = list(p.logit_bias)
                bias[k, i, : len(p.logit_bias)] = list(p.logit_bias.values())
            if flags.extras:
                prompt_ids[k, i, : len(r.prompt_ids)] = r.prompt_ids
                output_ids[k, i, : len(r.output_ids)] = r.output_ids
            if r.matcher is not None:
                if not allowed.shape[-1]:
                    raise ValueError("a structured output needs the sampler's token bitmask (pass vocab_size)")
                r.matcher.fill(allowed[k, i])
    return SamplerInputs(
        temperature,
        top_k,
        top_p,
        min_p,
        rep,
        freq,
        pres,
        seed,
        step,
        stop_ids,
        min_left,
        prompt_ids,
        output_ids,
        bias_ids,
        bias,
        allowed,
    )
