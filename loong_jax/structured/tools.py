"""Tool calls: how a model family writes them, the grammar that makes a model call one, and the parser that
finds the calls in what it wrote, whole or as it streams (one parser for both, so they agree).

Families (chosen from the chat template, or by name): "hermes" (Hermes, Qwen2.5: one `<tool_call>` block of
JSON per call, `{"name": ..., "arguments": {...}}`), "llama3_json" (Llama 3.1: bare JSON objects with
`"parameters"`, separated by "; "), "mistral" (`[TOOL_CALLS]` then a JSON list of calls). A template that
knows nothing of tools gets them described by `default_tool_prompt`, in the Hermes format.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from loong_jax.model.sampling import closed_schema
from loong_jax.structured.grammar import JSON_WHITESPACE

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """How one model family writes its calls."""

    name: str
    open: str  # text before a call (hermes) or before the list of calls (mistral)
    close: str  # text after a call (hermes)
    args_key: str  # "arguments" or "parameters"
    separator: str  # between two calls

    def grammar(self, tools: Sequence[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance) whose every sentence is one call (or several, if parallel) of one of
        the tools, its arguments valid against the tool's parameters schema (closed: no argument beyond
        those declared unless the schema allows them)."""
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["name"]}, self.args_key: closed_schema(t["parameters"])},
                    "required": ["name", self.args_key],
                    "additionalProperties": False,
                }
                for t in tools
            ],
            "x-guidance": {"whitespace_pattern": JSON_WHITESPACE},
        }
        if self.name == "mistral":
            calls = {"type": "array", "items": call, "minItems": 1, "x-guidance": call.pop("x-guidance")}
            if not parallel:
                calls["maxItems"] = 1
            return f"start: {json.dumps(self.open)} calls\ncalls: %json {json.dumps(calls)}"
        more = f" ({json.dumps(self.separator)} call)*" if parallel else ""
        # a newline may end the calls (models write one after a closing tag; without it the separator would
        # force another call)
        return (
            f'start: call{more} "\\n"?\ncall: {json.dumps(self.open)} body {json.dumps(self.close)}\n'
            f"body: %json {json.dumps(call)}"
        )

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self)


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "\n"),
    "llama3_json": ToolFormat("llama3_json", "", "", "parameters", "; "),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", ", "),
}


def format_for_template(template: str | None, name: str | None = None) -> ToolFormat:
    """The family named, or the one the chat template writes (Hermes where it does not say)."""
    if name is not None:
        if name not in FORMATS:
            raise ValueError(f"tool call parser must be one of {', '.join(FORMATS)}, got {name!r}")
        return FORMATS[name]
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in template or "ipython" in template:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (else `default_tool_prompt` describes them)."""
    return bool(template) and "tools" in template


def default_tool_prompt(tools: Sequence[dict[str, Any]], fmt: ToolFormat) -> str:
    """A system prompt describing the tools and how to call them, for templates that have none."""
    listed = "\n".join(json.dumps({"type": "function", "function": t}) for t in tools)
    example = json.dumps({"name": "<function name>", fmt.args_key: {"<argument>": "<value>"}})
    return (
        "You may call functions to help answer. Their signatures, as JSON schemas:\n"
        f"{listed}\n"
        "To call a function, answer with nothing else than\n"
        f"{fmt.open}{example}{fmt.close}\n"
        "and the result will be given to you."
    )


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools` ([{"type": "function", "function": {name, description, parameters}}]) as a list of
    functions; ValueError naming what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise ValueError(f"tools[{i}].function.name {name!r} is given twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description")
        entry = {"name": name, "parameters": params}
        if isinstance(desc, str):
            entry["description"] = desc
        out.append(entry)
    return out


class ToolCallParser:
    """Finds calls in a model's output as it grows: `feed` returns the text that is surely content and the
    calls completed so far, holding back what may be the start of a call; `finish` settles the rest (an
    unfinished or malformed call is content)."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._pending = ""  # text held back
        self._after_call = False  # newlines right after a call separate calls: dropped, however they arrive
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        if self.fmt.name == "hermes":
            return self._hermes(final=False)
        return self._whole(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self.fmt.name == "hermes":
            return self._hermes(final=True)
        return self._whole(final=True)

    def _hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        """Calls between tags. The JSON is decoded from the open tag on, so a close tag inside an argument's
        string does not end the call; text up to the first close tag is content when it is not a call."""
        content, calls = "", []
        open_, close = self.fmt.open.strip(), self.fmt.close.strip()
        while True:
            if self._after_call:
                self._pending = self._pending.lstrip("\n")
                self._after_call = not self._pending
            at = self._pending.find(open_)
            if at < 0:
                keep = 0 if final else _partial_suffix(self._pending, open_)
                content += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep :]
                return content, calls
            content, self._pending = content + self._pending[:at], self._pending[at:]
            body = self._pending[len(open_) :]
            call, after, unfinished = _decode_call(body, self.fmt.args_key)
            tail = body[after:].lstrip() if after is not None else ""
            if call is not None and tail.startswith(close):
                calls.append(call)
                self.calls.append(call)
                self._pending, self._after_call = tail[len(close) :], True
                continue
            end = self._pending.find(close)
            if after is not None:
                unfinished = close.startswith(tail)  # the close tag may be on its way
            if not final and (end < 0 or unfinished):
                return content, calls  # may still become a call
            if end < 0:  # cut before its end: the text stays text
                content, self._pending = content + self._pending, ""
                return content, calls
            content += self._pending[: end + len(close)]
            self._pending = self._pending[end + len(close) :].lstrip("\n")

    def _whole(self, final: bool) -> tuple[str, list[ToolCall]]:
        """llama3_json and mistral: an output that starts like a call is held whole and parsed at its end."""
        head = self._pending.lstrip()
        marker = self.fmt.open or "{"
        maybe = head.startswith(marker) or (not final and marker.startswith(head))
        if not maybe:
            content, self._pending = self._pending, ""
            return content, []
        if not final:
            return "", []
        text, self._pending = self._pending, ""
        body = head[len(self.fmt.open) :]
        if self.fmt.name == "mistral":
            found = _parse_list(body, self.fmt.args_key)
        else:
            found = _parse_sequence(body, self.fmt.separator.strip(), self.fmt.args_key)
        if not found or any(c is None for c in found):
            return text, []
        self.calls.extend(found)
        return "", found


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that is a beginning of marker (held back: it may become one)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _call_from(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _decode_call(text: str, args_key: str) -> tuple[ToolCall | None, int | None, bool]:
    """The JSON value at the start of text (after whitespace) as a call, where it ends (None: no whole value
    there), and whether decoding failed only for want of more text (it stopped inside a string or at the
    end: a close tag seen so far may be inside an argument's string)."""
    try:
        obj, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except json.JSONDecodeError as e:
        return None, None, e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())
    return _call_from(obj, args_key), end, False


def _parse_sequence(text: str, separator: str, args_key: str) -> list[ToolCall | None]:
    """JSON objects one after another with separator between them (llama3_json); [None] where the text is
    anything else. Decoded object by object, so a separator inside an argument's string is not a split."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return [None]
        found.append(_call_from(obj, args_key))
        rest = text[at:].lstrip()
        if not rest:
            return found
        if not rest.startswith(separator):
            return [None]
        at = len(text) - len(rest) + len(separator)


def _parse_list(text: str, args_key: str) -> list[ToolCall | None]:
    try:
        items = json.loads(text)
    except ValueError:
        return []
    return [_call_from(x, args_key) for x in items] if isinstance(items, list) and items else []
