"""The Starlette application: validate, tokenise, enqueue, stream. Every decision is the engine's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from checkpoints.tokenizer import Tokenizer
from loong_jax.engine import RequestRejected
from loong_jax.model.sampling import StructuredOutput, brief
from loong_jax.structured.tools import (
    ToolCall,
    ToolFormat,
    default_tool_prompt,
    format_for_template,
    template_knows_tools,
)
from serving.access import Access
from serving.async_engine import AsyncEngine, Delta, EngineDead
from serving.errors import APIError, error_response
from serving.metrics import Metrics
from serving.openapi import openapi_document
from serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("loong_jax.serving")
DEFAULT_MAX_BODY_BYTES = 64 << 20  # the longest contexts served, as JSON text or token ids, with room to spare


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(f"the request body is larger than {limit:,} bytes (the server's --max-body-bytes)", 413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_json(raw: bytes, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body (run off the event loop: bodies may be megabytes)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError("the request body is not valid JSON here: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError("the request body holds a string that is not valid Unicode (a lone surrogate)") from None
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = brief(".".join(str(p) for p in first["loc"]), 100).strip("'")
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(f"{where}: {message} (got {brief(first.get('input'))})", param=where) from None


class Server:
    """Holds the engine, tokenizer and metrics behind the routes."""

    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        model_name: str,
        metrics: Metrics,
        access: Access,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        tool_format: ToolFormat | None = None,
    ):
        self.engine = engine
        self.tool_format = tool_format or format_for_template(tokenizer.chat_template)
        self.max_body_bytes = max_body_bytes
        tokenizer.max_token_bytes  # noqa: B018 (looked up now, not during the first request)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.access = access
        self.max_model_len = engine.engine.ecfg.max_model_len
        self.created = int(time.time())

    # ----- helpers --------------------------------------------------------------------------------

    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await _read_body(request, self.max_body_bytes)
        return await asyncio.to_thread(_decode_json, raw, model)

    def dead_reason(self) -> str:
        """Why the engine cannot serve (for /health and 503 answers)."""
        return self.engine.dead or "the engine thread is not running"

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                f"the model {brief(name)} does not exist; this server serves {self.model_name!r}",
                404,
                "model_not_found",
                param="model",
            )

    def _authorize(self, request: Request) -> str | None:
        """The API key the client presented (None if the server needs none); 401 if it is not valid."""
        return self.access.client(request.headers)

    @staticmethod
    def _check_supported(body: Any) -> None:
        field = body.unsupported()
        if field is not None:
            raise APIError(f"{field} is not supported by this server yet; leave it out", param=field)

    def _tokens(self, text: str, add_special_tokens: bool, prompt: bool = True) -> list[int]:
        """Token ids; a prompt too long for the context whatever its tokens is refused without tokenising it."""
        least = -(-len(text.encode("utf-8", "surrogatepass")) // self.tokenizer.max_token_bytes)
        if prompt and least > self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has at least "
                f"{least} tokens ({len(text)} characters). Please shorten the prompt."
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def _encode(self, text: str, add_special_tokens: bool = True, prompt: bool = True) -> list[int]:
        """Tokenise off the event loop: a multi-megabyte prompt must not stall other streams."""
        return await asyncio.to_thread(self._tokens, text, add_special_tokens, prompt)

    async def _chat_prompt(self, messages: Any, prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """The conversation's token ids; tools are given to a template that describes them, or described by a
        system prompt of ours (`default_tool_prompt`) where the template knows nothing of tools."""
        fmt, native = self.tool_format, template_knows_tools(self.tokenizer.chat_template)

        def render() -> list[int]:
            try:
                inputs = [m.as_template_input(fmt, native) for m in messages]
                listed = None
                if tools is not None and native:
                    listed = [{"type": "function", "function": t} for t in tools]
                elif tools is not None:
                    described = default_tool_prompt(tools, fmt)
                    if inputs[0]["role"] == "system":
                        inputs[0] = {**inputs[0], "content": inputs[0]["content"] + "\n\n" + described}
                    else:
                        inputs.insert(0, {"role": "system", "content": described})
                text = self.tokenizer.apply_chat_template(inputs, tools=listed)
            except ValueError as e:
                raise APIError(str(e), param="messages") from None
            return self._tokens(text, add_special_tokens=False, prompt=prompt)

        return await asyncio.to_thread(render)

    async def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [await self._encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [await self._encode(x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]  # type: ignore[arg-type]
        else:
            raise APIError("prompt must be a non-empty string, list of strings or list of token ids", param="prompt")
        if any(not x for x in prompts):
            raise APIError("the prompt is empty; give at least one token", param="prompt")
        return prompts

    async def _start(
        self,
        request: Request,
        key: str | None,
        prompts: list[list[int]],
        body: Any,
        max_tokens: int | None,
        logprobs,
        structured: StructuredOutput | None = None,
    ):
        """Submit n choices per prompt, all or none: every choice's parameters are checked first, and if the
        engine refuses one, the others already queued are aborted. The cache salt is the tenant's (see
        serving/access.py) and the client's."""
        salt = self.access.cache_salt(request.headers, key, body.cache_salt)
        try:
            structured = structured or body.structured_output()
            params = [
                body.sampling_params(i, max_tokens, logprobs, salt, structured) for _ in prompts for i in range(body.n)
            ]
        except ValueError as e:
            raise APIError(str(e)) from None
        started: list[tuple[int, asyncio.Queue]] = []
        try:
            for k, p in enumerate(prompts):
                for i in range(body.n):
                    started.append(await self.engine.add(p, params[k * body.n + i], body.priority))
        except (ValueError, RequestRejected) as e:
            for rid, _ in started:
                self.engine.abort(rid)
            raise APIError(str(e)) from None
        return started

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ----- routes ---------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        key = self._authorize(request)
        body = await self._parse(request, CompletionRequest)
        self._check_model(body.model)
        self._check_supported(body)
        if body.echo or body.suffix is not None:
            raise APIError("echo and suffix are not supported", param="echo" if body.echo else "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError("best_of must equal n when given", param="best_of")
        prompts = await self._prompts(body)
        started = await self._start(request, key, prompts, body, body.max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await self._respond(request, body, started, rid, "text_completion", prompts, self._completion_choice)

    async def chat(self, request: Request) -> Response:
        key = self._authorize(request)
        body = await self._parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        self._check_supported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            tools, choice = body.tool_request()
            forced = None
            if choice not in (None, "auto"):  # required or named: a grammar makes the model call
                if body.structured_output() is not None:
                    raise ValueError("a structured output cannot be combined with tool_choice required or named")
                callable_ = tools if choice == "required" else [t for t in tools if t["name"] == choice]
                parallel = body.parallel_tool_calls and choice == "required"
                forced = StructuredOutput(grammar=self.tool_format.grammar(callable_, parallel))
        except ValueError as e:
            raise APIError(str(e), param="tools") from None
        prompt = await self._chat_prompt(body.messages, tools=tools if choice is not None else None)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        started = await self._start(request, key, [prompt], body, max_tokens, logprobs, forced)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        choice_fn = self._chat_choice if choice is None else ToolCallChoices(self, self.tool_format)
        return await self._respond(request, body, started, rid, "chat.completion", [prompt], choice_fn)

    async def _respond(self, request, body, started, rid, kind, prompts, choice_fn) -> Response:
        usage_prompt = sum(len(p) for p in prompts)
        if body.stream:
            gen = self._stream(body, started, rid, kind, usage_prompt, choice_fn)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await self._collect(request, started)
        if results is None:  # the client went away: nobody reads the answer (logged quietly, not as an error)
            for r, _ in started:
                self.engine.abort(r)
            log.info("client of %s disconnected; aborted its %d choice(s)", rid, len(started))
            return Response(status_code=499)
        errors = [d.error for deltas in results for d in deltas if d.error]
        if errors:  # an engine failure is an error response, never a 200 with finish_reason "error"
            raise APIError(errors[0], 503 if not self.engine.alive else 500, "server_error")
        choices, completion, cached = [], 0, [0] * len(results)
        for index, deltas in enumerate(results):
            choices.append(choice_fn(index, deltas, final=True))
            completion += deltas[-1].completion_tokens if deltas else 0
            cached[index] = deltas[-1].cached_tokens if deltas else 0
        payload = {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(usage_prompt, completion, cached, body.n),
        }
        return JSONResponse(payload)

    async def _collect(self, request: Request, started) -> list[list[Delta]] | None:
        """Wait for every choice; None if the client went away meanwhile."""

        async def drain(q: asyncio.Queue) -> list[Delta]:
            out = []
            while not out or not out[-1].finished:
                out.append(await q.get())
            return out

        tasks = [asyncio.ensure_future(drain(q)) for _, q in started]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.5)
                if not all(t.done() for t in tasks) and await request.is_disconnected():
                    return None
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()

    async def _stream(self, body, started, rid, kind, usage_prompt, choice_fn) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta, usage at the end if asked, then [DONE]."""
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        created = int(time.time())
        merged: asyncio.Queue = asyncio.Queue()
        pending = {index for index in range(len(started))}
        completion, cached = [0] * len(started), [0] * len(started)

        async def forward(index: int, q: asyncio.Queue) -> None:
            while True:
                delta = await q.get()
                await merged.put((index, delta))
                if delta.finished:
                    return

        tasks = [asyncio.ensure_future(forward(i, q)) for i, (_, q) in enumerate(started)]
        finished_ok = False
        try:
            if kind == "chat.completion":
                for index in range(len(started)):
                    first = {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield _sse(
                        {
                            "id": rid,
                            "object": chunk_kind,
                            "created": created,
                            "model": self.model_name,
                            "choices": [first],
                        }
                    )
            while pending:
                index, delta = await merged.get()
                completion[index], cached[index] = delta.completion_tokens, delta.cached_tokens
                if delta.error:  # the engine failed it: an error event ends the stream
                    code, kind = (503, "service_unavailable") if not self.engine.alive else (500, "server_error")
                    yield _sse({"error": {"message": delta.error, "type": kind, "param": None, "code": code}})
                    break
                if delta.finished:
                    pending.discard(index)
                if not (delta.text or delta.token_ids or delta.finished):
                    continue
                parts = choice_fn(index, [delta], final=False)
                for part in parts if isinstance(parts, list) else [parts]:  # tool calls may take several chunks
                    chunk = {
                        "id": rid,
                        "object": chunk_kind,
                        "created": created,
                        "model": self.model_name,
                        "choices": [part],
                    }
                    yield _sse(chunk)
            if body.stream_options and body.stream_options.include_usage:
                usage = _usage(usage_prompt, sum(completion), cached, body.n)
                yield _sse(
                    {
                        "id": rid,
                        "object": chunk_kind,
                        "created": created,
                        "model": self.model_name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield "data: [DONE]\n\n"
            finished_ok = True
        finally:
            for t in tasks:
                t.cancel()
            if not finished_ok:  # the client went away: free the KV of every unfinished choice
                for r, _ in started:
                    self.engine.abort(r)

    def _logprobs_completion(self, deltas: list[Delta]) -> dict[str, Any]:
        """The tokens of the text returned, each with where its text starts in the completion's text."""
        tokens, lps, tops, offsets = [], [], [], []
        for d in deltas:
            for tok, lp, top, at in zip(d.token_ids, d.logprobs, d.top_logprobs, d.text_offsets):
                tokens.append(self._token_text(tok))
                lps.append(lp)
                tops.append({self._token_text(t): v for t, v in top})
                offsets.append(at)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _logprobs_chat(self, deltas: list[Delta]) -> dict[str, Any]:
        content = []
        for d in deltas:
            for tok, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs):
                content.append(
                    {
                        "token": self._token_text(tok),
                        "logprob": lp,
                        "bytes": list(self.tokenizer.token_bytes(tok)),  # the token's own bytes, even a partial
                        "top_logprobs": [  # character's (its decoded text would be U+FFFD)
                            {"token": self._token_text(t), "logprob": v, "bytes": list(self.tokenizer.token_bytes(t))}
                            for t, v in top
                        ],
                    }
                )
        return {"content": content}

    def _completion_choice(self, index: int, deltas: list[Delta], final: bool) -> dict[str, Any]:
        last = deltas[-1]
        return {
            "index": index,
            "text": "".join(d.text for d in deltas),
            "logprobs": self._logprobs_completion(deltas) if last.wants_logprobs else None,
            "finish_reason": _finish(last),
            "stop_reason": last.stop_reason if last.finished else None,
        }

    def _chat_choice(self, index: int, deltas: list[Delta], final: bool) -> dict[str, Any]:
        last = deltas[-1]
        text = "".join(d.text for d in deltas)
        logprobs = self._logprobs_chat(deltas) if last.wants_logprobs else None
        if final:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": _finish(last)}
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": _finish(last)}

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "loong-jax",
            "max_model_len": self.max_model_len,
        }

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        """OpenAI's retrieve-model route."""
        self._authorize(request)
        name = request.path_params["model"]
        self._check_model(name)
        return JSONResponse(self._model_card())

    async def server_info(self, request: Request) -> Response:
        """Operator details: how the KV pools were sized (memory budget, weights, programs' working memory)."""
        self.access.operator(request.headers)
        capacity = self.engine.engine.kv_capacity
        e = self.engine.engine.ecfg
        info = {
            "model": self.model_name,
            "num_instances": e.num_instances,
            "tp": e.tp,
            "max_model_len": self.max_model_len,
            "cache_isolation": self.access.cache_isolation,
            "kv_cache": None if capacity is None else capacity.as_dict(),
        }
        return JSONResponse(info)

    async def health(self, request: Request) -> Response:
        if self.engine.alive:
            return JSONResponse({"status": "ok"})
        reason = self.dead_reason()
        body = {"status": "unavailable", "reason": reason}
        return JSONResponse({**body, "error": {"message": reason, "type": "service_unavailable", "code": 503}}, 503)

    async def tokenize(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._parse(request, TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:  # counting tokens is allowed past the context
            tokens = await self._chat_prompt(body.messages, prompt=False)
        else:
            tokens = await self._encode(body.prompt, body.add_special_tokens, prompt=False)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len})

    async def detokenize(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._parse(request, DetokenizeRequest)
        self._check_model(body.model)
        vocab = self.engine.engine.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def metrics_route(self, request: Request) -> Response:
        self.access.operator(request.headers)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class ToolCallChoices:
    """Chat choices whose text may hold tool calls, found by the model family's parser: whole for an answer,
    or as each streamed choice's text grows (a parser per choice, so both find the same calls). A streamed
    call is sent as OpenAI does: a delta with its index, id, type and name, then its arguments."""

    def __init__(self, server: Server, fmt: ToolFormat):
        self.server, self.fmt = server, fmt
        self.parsers: dict[int, Any] = {}

    def __call__(self, index: int, deltas: list[Delta], final: bool) -> dict[str, Any] | list[dict[str, Any]]:
        last = deltas[-1]
        logprobs = self.server._logprobs_chat(deltas) if last.wants_logprobs else None
        if final:
            parser = self.fmt.parser()
            content, calls = parser.feed("".join(d.text for d in deltas))
            rest, more = parser.finish()
            content, calls = content + rest, calls + more
            message: dict[str, Any] = {"role": "assistant", "content": (content.strip() or None) if calls else content}
            if calls:
                message["tool_calls"] = [_call_json(c) for c in calls]
            return {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": _tool_finish(last, calls),
            }
        parser = self.parsers.setdefault(index, self.fmt.parser())
        content, calls = parser.feed(last.text)
        if last.finished:
            rest, more = parser.finish()
            content, calls = content + rest, calls + more
        parts = [{"content": content}] if content else []
        for k, call in enumerate(calls, start=len(parser.calls) - len(calls)):  # the call's index in the choice
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            parts += [{"tool_calls": [head]}, {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]}]
        parts = parts or [{}]
        chunks = [{"index": index, "delta": p, "logprobs": None, "finish_reason": None} for p in parts]
        chunks[0]["logprobs"] = logprobs
        if last.finished:
            chunks[-1]["finish_reason"] = _tool_finish(last, parser.calls)
        return chunks


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_finish(delta: Delta, calls: list[ToolCall]) -> str | None:
    """finish_reason: "tool_calls" where the model called and stopped by itself."""
    reason = _finish(delta)
    return "tool_calls" if calls and reason == "stop" else reason


def _finish(delta: Delta) -> str | None:
    if not delta.finished:
        return None
    return {"abort": "abort", "error": "error"}.get(delta.finish_reason or "", delta.finish_reason)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: Server, on_shutdown: Any = None) -> Starlette:
    """The ASGI app; API errors become OpenAI-style JSON bodies."""

    def wrap(handler, needs_engine: bool = True):
        async def endpoint(request: Request) -> Response:
            try:
                if needs_engine and not server.engine.alive:
                    reason = server.dead_reason()
                    raise APIError(f"the server cannot serve requests: {reason}", 503, "service_unavailable")
                return await handler(request)
            except APIError as e:
                return error_response(e)
            except EngineDead as e:
                return error_response(APIError(f"the server cannot serve requests: {e}", 503, "service_unavailable"))
            except Exception as e:  # a bug must still answer in the API's shape
                log.exception("unexpected error in %s %s", request.method, request.url.path)
                return error_response(APIError(f"internal server error ({type(e).__name__})", 500, "server_error"))

        return endpoint

    routes = [
        Route("/v1/completions", wrap(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", wrap(server.chat), methods=["POST"]),
        Route("/v1/models", wrap(server.models), methods=["GET"]),
        Route("/v1/models/{model:path}", wrap(server.model), methods=["GET"]),
        Route("/server_info", wrap(server.server_info, needs_engine=False), methods=["GET"]),
        Route("/health", wrap(server.health, needs_engine=False), methods=["GET"]),
        Route("/tokenize", wrap(server.tokenize), methods=["POST"]),
        Route("/detokenize", wrap(server.detokenize), methods=["POST"]),
        Route("/metrics", wrap(server.metrics_route, needs_engine=False), methods=["GET"]),
        Route("/openapi.json", wrap(server.openapi, needs_engine=False), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    middleware = []
    if server.access.allowed_origins:  # browsers may call from these origins (off unless asked for)
        origins = list(server.access.allowed_origins)
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", server.access.tenant_header],
                max_age=600,
            )
        )
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


def _usage(prompt: int, completion: int, cached: list[int], n: int) -> dict[str, Any]:
    """OpenAI's usage object; a prompt's cached tokens are its first choice's (each prompt counts once)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached[::n])},
    }
