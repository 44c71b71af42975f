"""The Starlette application: validate, tokenise, enqueue, stream. Every decision is the engine's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from checkpoints.tokenizer import Tokenizer
from loong_jax.engine import RequestRejected
from serving.async_engine import AsyncEngine, Delta
from serving.metrics import Metrics
from serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param = message, status, kind, param


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}
    return JSONResponse(body, status_code=err.status)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(f"{where}: {first['msg']} (got {first.get('input')!r})", param=where) from None


class Server:
    """Holds the engine, tokenizer and metrics behind the routes."""

    def __init__(
        self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, metrics: Metrics, api_key: str | None
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.api_key = api_key
        self.max_model_len = engine.engine.ecfg.max_model_len
        self.created = int(time.time())

    # ----- helpers --------------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {self.model_name!r}", param="model")

    def _authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError("invalid or missing API key (Authorization: Bearer ...)", 401, "authentication_error")

    def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.tokenizer.encode(x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]  # type: ignore[arg-type]
        else:
            raise APIError("prompt must be a non-empty string, list of strings or list of token ids", param="prompt")
        if any(not x for x in prompts):
            raise APIError("the prompt is empty; give at least one token", param="prompt")
        return prompts

    async def _submit(self, prompt: list[int], body: Any, index: int, max_tokens: int | None, logprobs: int | None):
        try:
            params = body.sampling_params(index, max_tokens, logprobs)
            return await self.engine.add(prompt, params, body.priority)
        except (ValueError, RequestRejected) as e:
            raise APIError(str(e)) from None

    async def _start(self, prompts: list[list[int]], body: Any, max_tokens: int | None, logprobs: int | None):
        """Submit n choices per prompt; if any is refused, abort the others and report the refusal."""
        started: list[tuple[int, asyncio.Queue]] = []
        try:
            for p in prompts:
                for i in range(body.n):
                    started.append(await self._submit(p, body, i, max_tokens, logprobs))
        except APIError:
            for rid, _ in started:
                self.engine.abort(rid)
            raise
        return started

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ----- routes ---------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _parse(request, CompletionRequest)
        self._check_model(body.model)
        if body.echo or body.suffix is not None:
            raise APIError("echo and suffix are not supported", param="echo" if body.echo else "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError("best_of must equal n when given", param="best_of")
        prompts = self._prompts(body)
        started = await self._start(prompts, body, body.max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await self._respond(request, body, started, rid, "text_completion", prompts, self._completion_choice)

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            text = self.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        started = await self._start([prompt], body, max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._respond(request, body, started, rid, "chat.completion", [prompt], self._chat_choice)

    async def _respond(self, request, body, started, rid, kind, prompts, choice_fn) -> Response:
        usage_prompt = sum(len(p) for p in prompts)
        if body.stream:
            gen = self._stream(body, started, rid, kind, usage_prompt, choice_fn)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await self._collect(request, started)
        except asyncio.CancelledError:
            for r, _ in started:
                self.engine.abort(r)
            raise
        choices, completion = [], 0
        for index, deltas in enumerate(results):
            choices.append(choice_fn(index, deltas, final=True))
            completion += deltas[-1].completion_tokens if deltas else 0
        payload = {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": usage_prompt,
                "completion_tokens": completion,
                "total_tokens": usage_prompt + completion,
            },
        }
        return JSONResponse(payload)

    async def _collect(self, request: Request, started) -> list[list[Delta]]:
        """Wait for every choice; a client that goes away aborts them all."""

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
                    raise asyncio.CancelledError
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
        completion = [0] * len(started)

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
                completion[index] = delta.completion_tokens
                if delta.finished:
                    pending.discard(index)
                if not (delta.text or delta.token_ids or delta.finished):
                    continue
                chunk = {
                    "id": rid,
                    "object": chunk_kind,
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice_fn(index, [delta], final=False)],
                }
                yield _sse(chunk)
            if body.stream_options and body.stream_options.include_usage:
                total = sum(completion)
                usage = {
                    "prompt_tokens": usage_prompt,
                    "completion_tokens": total,
                    "total_tokens": usage_prompt + total,
                }
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
        tokens, lps, tops = [], [], []
        for d in deltas:
            for tok, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs):
                tokens.append(self._token_text(tok))
                lps.append(lp)
                tops.append({self._token_text(t): v for t, v in top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}

    def _logprobs_chat(self, deltas: list[Delta]) -> dict[str, Any]:
        content = []
        for d in deltas:
            for tok, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs):
                text = self._token_text(tok)
                content.append(
                    {
                        "token": text,
                        "logprob": lp,
                        "bytes": list(text.encode()),
                        "top_logprobs": [
                            {"token": self._token_text(t), "logprob": v, "bytes": list(self._token_text(t).encode())}
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

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        data = [
            {
                "id": self.model_name,
                "object": "model",
                "created": self.created,
                "owned_by": "loong-jax",
                "max_model_len": self.max_model_len,
            }
        ]
        capacity = self.engine.engine.kv_capacity
        if capacity is not None:
            data[0]["kv_cache"] = capacity.as_dict()
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.engine.alive else 503)

    async def tokenize(self, request: Request) -> Response:
        self._authorize(request)
        body = await _parse(request, TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = self.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len})

    async def detokenize(self, request: Request) -> Response:
        self._authorize(request)
        body = await _parse(request, DetokenizeRequest)
        self._check_model(body.model)
        vocab = self.engine.engine.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)})

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _finish(delta: Delta) -> str | None:
    if not delta.finished:
        return None
    return {"abort": "abort", "error": "error"}.get(delta.finish_reason or "", delta.finish_reason)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: Server, on_shutdown: Any = None) -> Starlette:
    """The ASGI app; API errors become OpenAI-style JSON bodies."""

    def wrap(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return error_response(e)

        return endpoint

    routes = [
        Route("/v1/completions", wrap(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", wrap(server.chat), methods=["POST"]),
        Route("/v1/models", wrap(server.models), methods=["GET"]),
        Route("/health", wrap(server.health), methods=["GET"]),
        Route("/tokenize", wrap(server.tokenize), methods=["POST"]),
        Route("/detokenize", wrap(server.detokenize), methods=["POST"]),
        Route("/metrics", wrap(server.metrics_route), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    return Starlette(routes=routes, lifespan=lifespan)
