"""Tokenizer and chat template, built from a Hugging Face `tokenizer.json` or from GGUF metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (byte-level BPE tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}

# llama.cpp pre-tokenizer names whose split rule we reproduce (GPT-2 regex, digits split individually or not).
_GGUF_PRE_DIGITS = {"smollm": True, "default": False, "gpt2": False}


class Tokenizer:
    """Text <-> token ids, special tokens and the model's chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
        add_bos: bool = False,
        special_tokens: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.special_tokens = dict(special_tokens or {})
        self._template: jinja2.Template | None = None
        self._byte_level: bool | None = None  # whether tokens are GPT-2 byte-level strings (looked up once)
        self._max_token_bytes: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch entry points release the GIL while they work (`encode` holds it: seconds for megabytes).
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        ids = batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n bytes has at least n / this many tokens."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max(1, max(len(self.token_bytes(i)) for i in range(self.vocab_size)))
        return self._max_token_bytes

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token may hold part of a UTF-8 character)."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            return b""
        if self._byte_level is None:
            self._byte_level = '"ByteLevel"' in json.dumps(json.loads(self.backend.to_str()).get("decoder"))
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages with the model's Jinja chat template (sandboxed, as transformers does); `tools`
        ([{"type": "function", "function": {...}}]) are given to templates that describe them."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt instead")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise ValueError(f"chat template error: {message}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        extra = {} if tools is None else {"tools": list(tools)}
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens, **extra
        )

    def to_files(self) -> dict[str, str]:
        """Serialisable form (tokenizer.json text and a small config) for checkpoint conversion."""
        meta = {
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "chat_template": self.chat_template,
            "add_bos": self.add_bos,
            "special_tokens": self.special_tokens,
        }
        return {"tokenizer.json": self.backend.to_str(), "loong_tokenizer.json": json.dumps(meta)}

    @classmethod
    def from_files(cls, tokenizer_json: str, meta_json: str) -> Tokenizer:
        meta = json.loads(meta_json)
        return cls(HFTokenizer.from_str(tokenizer_json), **meta)


def byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], split_digits: bool
) -> HFTokenizer:
    """A GPT-2 style byte-level BPE tokenizer from a GGUF vocabulary (token type 3 = control token)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    splits = []
    if split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


def gguf_pre_splits_digits(pre: str) -> bool:
    if pre not in _GGUF_PRE_DIGITS:
        raise ValueError(
            f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported: {sorted(_GGUF_PRE_DIGITS)}"
        )
    return _GGUF_PRE_DIGITS[pre]


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without re-decoding the whole output every step.

    Keeps a short window of already-emitted tokens as left context so that byte-level pieces and
    leading-space rules decode exactly as a full decode would; incomplete UTF-8 waits for more tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        full = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""
