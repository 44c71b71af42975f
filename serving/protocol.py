"""Request bodies of the OpenAI-compatible API (pydantic), and their translation to SamplingParams."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loong_jax.model.sampling import (
    MAX_CACHE_SALT_CHARS,
    MAX_INT32,
    MAX_LOGPROBS,
    SamplingParams,
    StructuredOutput,
    brief,
)
from loong_jax.structured.tools import ToolFormat, check_tools

MAX_SEED = 2**63 - 1
_EXTENSION_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus common engine extensions). Fields not
    listed are accepted and ignored, as OpenAI clients expect; fields listed as unsupported are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)  # see docs/prefix-caching.md
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (see structured_output)
    # extensions: a regex, a list of choices, a Lark/GBNF grammar or a JSON schema the output keeps to
    structured_outputs: dict[str, Any] | None = None  # {"regex": ...} or {"choice": [...]}, "grammar", "json"
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # accepted only as their no-op values until they are implemented (tools: chat completions only)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None
    # extensions known from other open-source servers
    top_k: int = Field(0, ge=-1, le=MAX_INT32)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=-MAX_INT32, le=MAX_INT32)  # higher is scheduled first

    def unsupported(self) -> str | None:
        """The first field asking for a feature this server does not implement, or None."""
        if self.functions or self.function_call not in (None, "none", "auto"):
            return "functions (deprecated by OpenAI: use tools)" if self.functions else "function_call"
        if self.modalities not in (None, ["text"]):
            return "modalities"
        for name in ("audio", "web_search_options"):
            if getattr(self, name) is not None:
                return name
        return None

    def sampling_params(
        self,
        index: int,
        max_tokens: int | None,
        logprobs: int | None,
        cache_salt: str | None,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        """Parameters of the index-th of n choices (seeded choices get distinct, reproducible seeds), keeping
        to `structured`: the request's `structured_output()`, or a forced tool call's grammar."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=None if self.seed is None else self.seed + index,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=None if self.logit_bias is None else _token_bias(self.logit_bias),
            cache_salt=cache_salt,
            structured_output=structured,
        )

    def structured_output(self) -> StructuredOutput | None:
        """The constraint asked for by response_format or by one of the extension fields (at most one)."""
        given = {}
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type", "text")
            if kind == "json_object":
                given["response_format"] = StructuredOutput(json_object=True)
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
                    raise ValueError(
                        'response_format of type json_schema needs {"json_schema": {"name": ..., "schema": {...}}}'
                    )
                given["response_format"] = StructuredOutput(json_schema=spec["schema"])  # strict or not: enforced
            elif kind != "text":
                raise ValueError(f"response_format type must be text, json_object or json_schema, got {brief(kind)}")
        extra = dict(self.structured_outputs or {})
        unknown = set(extra) - set(_EXTENSION_KINDS)
        if unknown:
            raise ValueError(f"structured_outputs takes one of {', '.join(_EXTENSION_KINDS)}, got {sorted(unknown)}")
        for name in _EXTENSION_KINDS:
            legacy = getattr(self, f"guided_{name}")
            if legacy is not None:
                extra[f"guided_{name}"] = legacy
        for name, value in extra.items():
            kind = _EXTENSION_KINDS[name.removeprefix("guided_")]
            if kind == "json_schema" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"{name} must be a JSON schema (an object, or its JSON text): {e}") from None
            given[name if name.startswith("guided_") else f"structured_outputs.{name}"] = StructuredOutput(
                **{kind: value}
            )
        if len(given) > 1:
            raise ValueError(f"ask for one structured output at a time, got {', '.join(given)}")
        return next(iter(given.values()), None)


def _token_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as strings."""
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit():
            raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {brief(key)}")
        out[int(key)] = value
    return out


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.tools or self.tool_choice not in (None, "none"):
            return "tools (on chat completions only)" if self.tools else "tool_choice"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's calls earlier in the conversation
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        """Only text: a part of another type (an image, audio) is refused by name, not as a type mismatch."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"content must be a string or a list of text parts, got {brief(content)}")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    "only text content parts ({'type': 'text', 'text': '...'}) are supported, got a part of type "
                    f"{brief(kind)}"
                    if kind != "text"
                    else "a text part needs its text as a string"
                )
        return content

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts), not null")
        return self

    def as_template_input(self, fmt: ToolFormat | None = None, native_tools: bool = False) -> dict[str, Any]:
        """The message as chat templates take it. An assistant's tool calls: with their arguments as objects
        for templates that know tools (as Hugging Face's do), else written in the model family's format
        into its content."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    args = json.loads(call.function.arguments)
                except ValueError:
                    raise ValueError(
                        f"tool call arguments must be JSON text, got {brief(call.function.arguments)}"
                    ) from None
                calls.append(
                    {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}
                )
            if native_tools or fmt is None:
                out["tool_calls"] = calls
            else:
                written = [
                    fmt.open
                    + json.dumps({"name": c["function"]["name"], fmt.args_key: c["function"]["arguments"]})
                    + fmt.close
                    for c in calls
                ]
                out["content"] = (out["content"] + "\n" if out["content"] else "") + fmt.separator.join(written)
        return out


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: bool = True

    def tool_request(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The tools (checked) and the tool choice: None, "auto", "required" or a function's name."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            return None, None
        tools = check_tools(self.tools)
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        if choice == "none":
            return tools, None
        if choice in ("auto", "required"):
            return tools, choice
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(
                "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}, got "
                + brief(choice)
            )
        if name not in [t["name"] for t in tools]:
            raise ValueError(f"tool_choice names the function {brief(name)}, which is not among the tools")
        return tools, name


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]
