"""Host-side batch assembly: padded numpy inputs for the prefill and decode programs, with shape buckets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loong_jax.programs import DecodeInputs, PrefillInputs
from loong_jax.request import Request
from loong_jax.sampling import MAX_BANNED, MAX_LOGPROBS, SamplerFlags, SamplerInputs, seed_words


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the shape a batch of n rows is padded to."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def sampler_flags(reqs: Sequence[Request]) -> SamplerFlags:
    want = max((r.params.logprobs or 0) for r in reqs) if reqs else 0
    return SamplerFlags(
        penalties=any(r.params.uses_penalties for r in reqs),
        filters=any(r.params.uses_filters for r in reqs),
        top_logprobs=0 if want == 0 else min(MAX_LOGPROBS, bucket(want, 4)),
    )


def sampler_inputs(reqs: Sequence[Request], rows: int, flags: SamplerFlags) -> SamplerInputs:
    """Per-row sampler arrays for reqs, padded to `rows` (padding rows are greedy)."""
    f32 = lambda fill: np.full(rows, fill, np.float32)  # noqa: E731
    temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
    rep, freq, pres = f32(1.0), f32(0.0), f32(0.0)
    top_k, step = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    seed = np.zeros((rows, 2), np.uint32)
    banned = np.full((rows, MAX_BANNED), -1, np.int32)
    lp = bucket(max(len(r.prompt_ids) for r in reqs), 16) if flags.penalties else 0
    lo = bucket(max(len(r.output_ids) for r in reqs), 16) if flags.penalties else 0
    prompt_ids = np.full((rows, lp), -1, np.int32)
    output_ids = np.full((rows, lo), -1, np.int32)
    for i, r in enumerate(reqs):
        p = r.params
        temperature[i], top_p[i], min_p[i], top_k[i] = p.temperature, p.top_p, p.min_p, max(p.top_k, 0)
        rep[i], freq[i], pres[i] = p.repetition_penalty, p.frequency_penalty, p.presence_penalty
        seed[i] = seed_words(r.seed)
        step[i] = len(r.output_ids)
        if len(r.output_ids) < p.min_tokens and not p.ignore_eos:
            banned[i, : len(r.eos_ids[:MAX_BANNED])] = r.eos_ids[:MAX_BANNED]
        if flags.penalties:
            prompt_ids[i, : len(r.prompt_ids)] = r.prompt_ids
            output_ids[i, : len(r.output_ids)] = r.output_ids
    return SamplerInputs(temperature, top_k, top_p, min_p, rep, freq, pres, seed, step, banned, prompt_ids, output_ids)


def prefill_inputs(
    prompts: Sequence[Sequence[int]], slots: Sequence[np.ndarray], num_slots: int, tokens: int, rows: int
) -> PrefillInputs:
    """Pack prompts back to back into `tokens` rows; `slots[i]` are the pool slots of prompt i's tokens."""
    tok = np.zeros(tokens, np.int32)
    pos = np.zeros(tokens, np.int32)
    seg = np.full(tokens, -1, np.int32)
    seq_lens = np.ones(tokens, np.int32)
    slot = np.full(tokens, num_slots, np.int32)
    last = np.zeros(rows, np.int32)
    at = 0
    for i, (ids, s) in enumerate(zip(prompts, slots)):
        n = len(ids)
        tok[at : at + n] = ids
        pos[at : at + n] = np.arange(n)
        seg[at : at + n] = i
        seq_lens[at : at + n] = n
        slot[at : at + n] = s
        last[i] = at + n - 1
        at += n
    return PrefillInputs(tok, pos, seg, seq_lens, slot, last)


def decode_inputs(
    tokens: Sequence[int],
    positions: Sequence[int],
    slots: Sequence[int],
    page_rows: Sequence[np.ndarray],
    kv_lens: Sequence[int],
    num_slots: int,
    rows: int,
    width: int,
) -> DecodeInputs:
    """Decode step inputs padded to `rows` requests and page tables `width` pages wide."""
    n = len(tokens)
    tok = np.zeros(rows, np.int32)
    pos = np.zeros(rows, np.int32)
    slot = np.full(rows, num_slots, np.int32)
    table = np.zeros((rows, width), np.int32)
    lens = np.zeros(rows, np.int32)
    tok[:n], pos[:n], slot[:n], lens[:n] = tokens, positions, slots, kv_lens
    for i, row in enumerate(page_rows):
        table[i, : len(row)] = row
    return DecodeInputs(tok, pos, slot, table, lens)
