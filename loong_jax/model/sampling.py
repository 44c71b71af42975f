"""Sampling parameters (validated on the host) and the on-device sampler.

The sampler is a pure function over a batch of logits and per-row parameter arrays. Whether a batch samples
at all, and whether it needs penalties, logit bias or top logprobs (extra inputs and outputs), are static
switches (part of a program's key), never run-time branches: a `lax.cond` makes an accelerator copy its
predicate to the host and wait. Top-k and top-p need no vocabulary sort: the smallest kept probability is
found by bisection over the probabilities' bit patterns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import reprlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 16
MAX_EOS_IDS = 4  # a model's end-of-sequence ids banned before min_tokens
MAX_BANNED = MAX_EOS_IDS + MAX_STOP_TOKEN_IDS  # EOS and stop token ids masked before min_tokens
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias
MIN_TEMPERATURE = 1e-5  # below this, dividing the logits overflows: such temperatures sample greedily
MAX_INT32 = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # a stream holds back this much text: longer stop strings would stall it
MAX_STOP_TOTAL_CHARS = 1024  # all of a request's stop strings, scanned at every step
MAX_CACHE_SALT_CHARS = 1024
QUOTE_CHARS = 200  # an error message quotes at most this much of a value it refuses


def brief(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to about `limit` characters: an error message never echoes a huge input."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 16
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_GRAMMAR_CHARS = 1_000_000  # a schema, regex or grammar of more text than this is refused


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A constraint on what a completion may be: exactly one of a JSON schema (a dict, or a pydantic model
    class), any JSON object, a regular expression, a list of choices, or a Lark (or GBNF/EBNF) grammar. The
    sampler only lets through tokens that keep the output inside it, and the end of the sequence only where
    the output is complete. Compiled by `loong_jax.structured` (whitespace inside JSON is bounded)."""

    json_schema: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        schema = self.json_schema
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
            object.__setattr__(self, "json_schema", closed_schema(schema.model_json_schema()))
        if self.choice is not None:
            choices = self.choice
            if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f"choice must be a non-empty list of non-empty strings, got {brief(self.choice)}")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"a structured output takes exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                + (", ".join(given) if given else "none")
            )
        if self.json_schema is not None and not isinstance(self.json_schema, dict | bool):
            raise ValueError(
                f"json_schema must be a JSON schema (a dict) or a pydantic model class, got {brief(self.json_schema)}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {brief(value)}")
        if len(self.text) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"a structured output's {self.kind} may have at most {MAX_GRAMMAR_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @functools.cached_property
    def text(self) -> str:
        """The constraint as one string (its cache key with the kind; a schema's JSON text, written once)."""
        value = getattr(self, self.kind)
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def closed_schema(schema: Any) -> Any:
    """A JSON schema whose objects take no properties beyond those declared unless it says otherwise, as
    OpenAI's client sends a pydantic model's (any others are allowed by default, and a small model fills
    them without end)."""
    if isinstance(schema, dict):
        schema = {k: closed_schema(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed_schema(v) for v in schema]
    return schema


@dataclasses.dataclass
class SamplingParams:
    """How to sample one completion. Defaults follow the OpenAI API (temperature 1, max_tokens 16)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    cache_salt: str | None = None  # prefix-cache namespace: only requests with the same salt share K/V pages
    structured_output: StructuredOutput | None = None  # JSON schema, regex, choices or grammar the output keeps to

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "seed", "min_tokens", "logprobs"):  # numpy integers are fine
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, name, int(value))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, float(value))
            else:
                raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [_int(t) for t in (self.stop_token_ids or [])]
        if isinstance(self.structured_output, dict):
            self.structured_output = StructuredOutput(**self.structured_output)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a mapping of token ids to numbers, got {self.logit_bias!r}")
            self.logit_bias = {_int(t): v for t, v in self.logit_bias.items()}
        self.validate()
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0  # greedy

    def validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {brief(getattr(self, name))}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 (or None for the rest of the context)")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_INT32:
            raise bad("top_k", f"an integer in [-1, {MAX_INT32}] (0 or -1 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "in (0, 10]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2**63)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} strings")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise bad("stop", f"strings of at most {MAX_STOP_STRING_CHARS} characters each")
        if sum(len(s) for s in self.stop) > MAX_STOP_TOTAL_CHARS:
            raise bad("stop", f"strings of at most {MAX_STOP_TOTAL_CHARS} characters in all")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"at most max_tokens ({self.max_tokens})")
        if not all(_is_token_id(t) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids (integers >= 0)")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
            for t, v in self.logit_bias.items():
                if not _is_token_id(t):
                    raise bad("logit_bias", "a mapping of token ids (integers >= 0) to numbers in [-100, 100]")
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -100.0 <= v <= 100.0:
                    raise bad("logit_bias", "a mapping of token ids to numbers in [-100, 100]")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS
        ):
            raise bad("cache_salt", f"a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters, or None")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise bad("structured_output", "a StructuredOutput (or a dict of its fields), or None")
            if self.min_tokens or self.ignore_eos:  # the grammar alone says where the output may end
                raise bad("min_tokens" if self.min_tokens else "ignore_eos", "unset with a structured output")

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def uses_extras(self) -> bool:
        """Whether sampling needs the extras variant of the sampler (penalties, logit bias, logprobs)."""
        return (
            self.uses_penalties
            or bool(self.logit_bias)
            or self.logprobs is not None
            or self.structured_output is not None
        )


def _is_token_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32


def _int(x: object) -> object:
    """Python int for any integer (numpy's too); anything else as given, for validate() to refuse."""
    return int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x


class SamplerFlags(NamedTuple):
    """Static switches of the sampler (part of a program's cache key): `sample` for batches where some row
    samples (temperature > 0; else every row takes its argmax), `extras` for penalties, logit bias and top
    logprobs (it implies `sample`). Three variants of each program (`VARIANTS`), all warmed up, so no
    request's first use of a feature compiles a program while other streams wait."""

    sample: bool = False
    extras: bool = False


VARIANTS = (SamplerFlags(), SamplerFlags(sample=True), SamplerFlags(sample=True, extras=True))


class SamplerInputs(NamedTuple):
    """Per-row sampler arrays ([R] unless noted); padded rows are greedy and ignored by the host."""

    temperature: jnp.ndarray
    top_k: jnp.ndarray
    top_p: jnp.ndarray
    min_p: jnp.ndarray
    repetition_penalty: jnp.ndarray
    frequency_penalty: jnp.ndarray
    presence_penalty: jnp.ndarray
    seed: jnp.ndarray  # [R, 2] uint32: the request's seed split in two words
    step: jnp.ndarray  # tokens generated so far: the key is fold_in(key(seed), step)
    stop_ids: jnp.ndarray  # [R, NB] token ids that end the row (EOS unless ignored, stop ids), -1 = none
    min_left: jnp.ndarray  # tokens still to come before a stop id may end the row (min_tokens): banned till then
    prompt_ids: jnp.ndarray  # [R, L] (extras only; else [R, 0]), -1 = padding
    output_ids: jnp.ndarray  # [R, L] (extras only; else [R, 0]), -1 = padding
    bias_ids: jnp.ndarray  # [R, MAX_LOGIT_BIAS] (extras only; else [R, 0]) token ids, -1 = none
    bias: jnp.ndarray  # [R, MAX_LOGIT_BIAS] float32 added to those tokens' logits
    allowed: jnp.ndarray  # [R, mask_words(V)] int32 (extras only; else [R, 0]): bit t % 32 of word t // 32 set
    #                       where token t may come next (a structured output's grammar); all ones: any token


class SamplerOutputs(NamedTuple):
    tokens: jnp.ndarray  # [R] int32
    logprob: jnp.ndarray  # [R] logprob of the chosen token under the model's distribution
    top_ids: jnp.ndarray  # [R, MAX_LOGPROBS] with extras, else [R, 0]
    top_logprobs: jnp.ndarray  # [R, K]


def mask_words(vocab_size: int) -> int:
    """32-bit words of one row's token bitmask."""
    return (vocab_size + 31) // 32


def _presence(ids: jnp.ndarray, vocab: int) -> jnp.ndarray:
    """Counts [R, V] of ids [R, L] (negative ids ignored)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    safe = jnp.where(ids >= 0, ids, vocab)
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, safe].add(1, mode="drop")


def sample(logits: jnp.ndarray, inp: SamplerInputs, flags: SamplerFlags) -> SamplerOutputs:
    """Choose one token per row of logits [R, V] (float32)."""
    r, vocab = logits.shape
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    x = logits
    if flags.extras and inp.allowed.shape[-1]:  # a grammar's tokens first: before penalties and truncation
        ids = jnp.arange(vocab)
        x = jnp.where(((inp.allowed[:, ids >> 5] >> (ids & 31)) & 1) > 0, x, -jnp.inf)
    if flags.extras:
        out_counts = _presence(inp.output_ids, vocab)
        seen = (_presence(inp.prompt_ids, vocab) + out_counts) > 0
        rp = inp.repetition_penalty[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rp, x * rp), x)
        x = x - inp.frequency_penalty[:, None] * out_counts - inp.presence_penalty[:, None] * (out_counts > 0)
    rows = jnp.arange(r)[:, None]
    if flags.extras:
        x = x.at[rows, jnp.where(inp.bias_ids >= 0, inp.bias_ids, vocab)].add(inp.bias, mode="drop")
    banned = jnp.where((inp.stop_ids >= 0) & (inp.min_left[:, None] > 0), inp.stop_ids, vocab)
    x = x.at[rows, banned].set(-jnp.inf, mode="drop")
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if flags.sample or flags.extras:
        tokens = jnp.where(inp.temperature > 0, _sample_tokens(x, inp), tokens).astype(jnp.int32)
    chosen_lp = jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
    if flags.extras:
        top_lp, top_ids = jax.lax.top_k(logprobs_all, min(MAX_LOGPROBS, vocab))
    else:
        top_lp, top_ids = jnp.zeros((r, 0), jnp.float32), jnp.zeros((r, 0), jnp.int32)
    return SamplerOutputs(tokens, chosen_lp, top_ids.astype(jnp.int32), top_lp)


def ends_row(inp: SamplerInputs, tokens: jnp.ndarray) -> jnp.ndarray:
    """Whether each row's sampled token [R] ends it: a stop id (EOS or a stop token) once min_tokens is met."""
    return jnp.any(inp.stop_ids == tokens[:, None], axis=-1) & (inp.min_left <= 0)


def advance(inp: SamplerInputs, tokens: jnp.ndarray, live: jnp.ndarray) -> SamplerInputs:
    """The inputs of each row's next token once live rows [R] sampled `tokens`: one more step (the seed's
    fold-in, exactly as if the host had built them), one fewer before min_tokens, the token among the
    output ids that penalties count."""
    n = live.astype(jnp.int32)
    out = inp.output_ids
    if out.shape[-1]:
        rows = jnp.arange(out.shape[0])
        at = jnp.where(live, inp.step, out.shape[-1])  # dead rows write nothing
        out = out.at[rows, at].set(tokens, mode="drop")
    return inp._replace(step=inp.step + n, min_left=inp.min_left - n, output_ids=out)


def _sample_tokens(x: jnp.ndarray, inp: SamplerInputs) -> jnp.ndarray:
    """Temperature, min-p, top-k and top-p, then one inverse-CDF draw per row (one uniform, not V)."""
    r, vocab = x.shape
    temp = jnp.where(inp.temperature > 0, inp.temperature, 1.0)[:, None]
    probs = jax.nn.softmax(x / temp, axis=-1)
    probs = jnp.where(probs >= inp.min_p[:, None] * probs.max(axis=-1, keepdims=True), probs, 0.0)
    kept = jax.lax.bitcast_convert_type(probs, jnp.int32) >= _smallest_kept(probs, inp.top_k, inp.top_p)[:, None]
    probs = jnp.where(kept, probs, 0.0)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.wrap_key_data(s), t))(inp.seed, inp.step)
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
    cdf = jnp.cumsum(probs, axis=-1)
    choice = jnp.minimum(jnp.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1), vocab - 1)
    return jnp.where(probs[jnp.arange(r), choice] > 0, choice, jnp.argmax(probs, axis=-1))


_ONE_BITS = 0x3F800000  # the bit pattern of 1.0f: no probability lies above it


def _smallest_kept(probs: jnp.ndarray, top_k: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """Per row of probs [R, V] (>= 0), the bit pattern of the smallest probability that top-k and top-p keep.

    A token is kept when fewer than k tokens are more likely than it and those hold less than top_p of the
    mass (the sorted-order rule, except that tokens tied with the k-th are all kept). Both counts only
    grow as the probability falls, so the rule holds above one threshold, found by bisection over the bit
    patterns (non-negative floats order as their bits do): 30 passes over the vocabulary where a sort
    costs ~20x more on a CPU, and no data-dependent branch.
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    k = jnp.where(top_k > 0, top_k, probs.shape[-1] + 1)
    cap = jnp.where(top_p < 1.0, top_p * probs.sum(axis=-1), jnp.inf)

    def halve(_, bounds):  # the threshold lies in (lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        above = bits > mid[:, None]
        ok = (above.sum(axis=-1) < k) & (jnp.where(above, probs, 0.0).sum(axis=-1) < cap)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.full(probs.shape[:1], -1, jnp.int32)
    _, hi = jax.lax.fori_loop(0, 31, halve, (lo, jnp.full_like(lo, _ONE_BITS)))  # 2^31 > the range
    return hi


def seed_words(seed: int) -> np.ndarray:
    """A 63-bit seed as the two uint32 words of a threefry key."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], dtype=np.uint32)
