"""Grammars of structured outputs (llguidance): a constraint becomes a grammar, checked against the model's
tokenizer before its request is queued (an invalid or unsupported schema is a clear error, never a failure
after admission) and compiled once per distinct constraint; each request then gets its own matcher, which
gives every step the tokens allowed next (a bitmask, 32 tokens a word) and follows the tokens sampled."""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from loong_jax.model.sampling import StructuredOutput, mask_words

# Whitespace between JSON tokens: at most this many characters in a row, so that a model cannot run on in
# blank space until max_tokens (enough for a newline and indentation a few levels deep).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"
CACHE_SIZE = 256  # compiled grammars kept (each request copies one: copying is cheap, compiling is not)


class Matcher:
    """One request's position in its grammar: which tokens may come next, and what was sampled."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._m = matcher
        self.ready: np.ndarray | None = None  # the next mask, computed ahead by GrammarCompiler.prepare

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into row [words] (int32, C-contiguous): bit t % 32 of word t // 32."""
        if self.ready is not None:
            row[:] = self.ready
        else:
            llnp.fill_next_token_bitmask(self._m, row[None], 0)

    def consume(self, token: int) -> None:
        """Follow a sampled token; a token the grammar did not allow is an error (the mask rules it out)."""
        self.ready = None
        if not self._m.consume_token(int(token)):
            raise ValueError(f"the structured output's grammar refused token {token}: {self._m.get_error()}")


class GrammarCompiler:
    """Compiles constraints for one model's tokenizer; thread-safe, so that the server compiles off its event
    loop and the engine loop never compiles."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], cache_size: int = CACHE_SIZE):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)  # where a grammar accepts, these end the output
        self.words = mask_words(vocab_size)
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[tuple[str, str], llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._cache_size = cache_size
        self._executor: llguidance.LLExecutor | None = None  # threads filling many masks at once

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:  # about 0.2 s for a 49K vocabulary: once
                tok = self._tokenizer
                if tok is None:
                    raise ValueError("this checkpoint has no tokenizer, so structured outputs are unavailable")
                backend = tok.backend.to_str()
                self._lltok = llguidance.LLTokenizer(backend, n_vocab=self.vocab_size, eos_token=self.eos_ids)
            return self._lltok

    @staticmethod
    def grammar(spec: StructuredOutput) -> str:
        """The llguidance grammar of a constraint (not yet checked)."""
        options = {"whitespace_pattern": JSON_WHITESPACE}
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=options)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", list(spec.choice))
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF / EBNF converted to Lark

    def matcher(self, spec: StructuredOutput) -> Matcher:
        """A fresh matcher for one request; ValueError naming the problem if the constraint is invalid or uses
        what the grammar engine does not support."""
        return Matcher(self._template(spec).deep_copy())

    def check(self, spec: StructuredOutput) -> None:
        """Raise ValueError if the constraint cannot be compiled (compiling it now, so its request is fast)."""
        self._template(spec)

    def _template(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled matcher of a constraint, from the cache or compiled now (requests copy it)."""
        key = (spec.kind, spec.text)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            template = self._compile(spec)
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return template

    def prepare(self, matchers: Sequence[Matcher]) -> None:
        """Compute the next masks of many matchers at once, on llguidance's threads (the GIL released): a
        batch's masks cost about one row's time on a host with the cores, not one row's time per row."""
        todo = [m for m in matchers if m.ready is None]
        if len(todo) < 2:
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        masks = np.empty((len(todo), self.words), np.int32)
        llnp.fill_next_token_bitmask_par(self._executor, [(m._m, i) for i, m in enumerate(todo)], masks)
        for m, row in zip(todo, masks):
            m.ready = row

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        name = spec.kind
        try:
            grammar = self.grammar(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid {name} for a structured output: {e}") from None
        tokenizer = self._llguidance_tokenizer()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed:
            raise ValueError(f"invalid or unsupported {name} for a structured output: {_brief(messages[0])}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid or unsupported {name} for a structured output: {_brief(matcher.get_error())}")
        return matcher


def _brief(message: str, limit: int = 500) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + "..."
