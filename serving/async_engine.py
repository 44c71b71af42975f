"""The engine on its own thread, with an asyncio face for the server.

The engine is not thread-safe, so every change to it (adding, aborting) is a command that its thread
applies between iterations. Each request gets an asyncio queue on the caller's event loop; after each
iteration the engine thread pushes what is new for every request it touched. A program that fails fails
only its own requests (the engine retires it); an unexpected error in an iteration fails the running
requests and the loop goes on, unless it keeps failing: then the engine thread stops, every request is
answered with an error, and `dead` says why (the server then answers 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from loong_jax.engine import Engine
from loong_jax.model.sampling import SamplingParams
from loong_jax.runtime.request import Request, Status
from loong_jax.runtime.work import FatalError

log = logging.getLogger("loong_jax.serving")


@dataclasses.dataclass
class Delta:
    """What one request produced since its previous delta."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finished: bool
    text_offsets: list[int] = dataclasses.field(default_factory=list)  # where each token's text starts
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    wants_logprobs: bool = False
    error: str | None = None  # why the engine failed the request (finish_reason "error")


@dataclasses.dataclass
class _Stream:
    req: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDead(RuntimeError):
    """The engine thread has stopped; no request can run."""


MAX_CONSECUTIVE_ERRORS = 3  # unexpected iteration errors in a row after which the engine is declared dead


class AsyncEngine:
    """Runs `engine.step()` in a loop on a dedicated thread; `generate()` streams one request's deltas."""

    def __init__(
        self, engine: Engine, on_iteration: Callable[[Engine, list[Request], float | None], None] | None = None
    ):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loong-engine", daemon=True)
        self._on_iteration = on_iteration
        self.iterations = 0
        self.errors = 0
        self.dead: str | None = None  # why the engine thread stopped, once it has

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between iterations; returns a future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.dead is not None:
            fut.set_exception(EngineDead(self.dead))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        if self.dead is not None:  # died meanwhile: nobody will run the command
            self._drain_commands()
        return fut

    async def add(
        self, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0
    ) -> tuple[int, asyncio.Queue]:
        """Queue a request (validated by the engine: errors raise here) and return its id and delta queue."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if params.structured_output is not None:  # compiled here, off the event loop and the engine loop
            await asyncio.to_thread(self.engine.grammars.check, params.structured_output)

        def add(engine: Engine) -> int:
            req = engine.add_request(prompt_ids, params, priority)
            self._streams[req.rid] = _Stream(req, loop, q)
            return req.rid

        rid = await asyncio.wrap_future(self.call(add))
        return rid, q

    def abort(self, rid: int) -> None:
        self.call(lambda engine: self._abort(engine, rid))

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Submit a request and yield its deltas until it finishes; leaving early aborts it."""
        rid, q = await self.add(prompt_ids, params)
        finished = False
        try:
            while not finished:
                delta: Delta = await q.get()
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self.abort(rid)

    # ----- the engine thread --------------------------------------------------------------------------

    def _abort(self, engine: Engine, rid: int) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            engine.abort(rid)
            if self._on_iteration is not None:  # metrics count the abort and drop the request's state
                self._on_iteration(engine, [stream.req], None)
            self._publish([stream.req])

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the thread stops: answer everyone rather than leave them waiting
            log.critical("the engine thread stopped: %s: %s", type(e).__name__, e, exc_info=e)
            self._die(f"the engine stopped ({type(e).__name__}: {e})")

    def _loop(self) -> None:
        engine = self.engine
        failures = 0
        while True:
            self._drain_commands()
            if self._stop.is_set() and not engine.has_unfinished():
                return
            if not engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                touched = engine.step(timeout=0.005)
                failures = 0
            except FatalError:
                raise  # the engine cannot go on: answer everyone (see _run)
            except Exception as e:
                failures += 1
                self.errors += 1
                if failures >= MAX_CONSECUTIVE_ERRORS:
                    raise
                log.exception("engine iteration failed; failing the running requests")
                touched = self._fail_running(engine, f"the engine failed ({type(e).__name__}: {e})")
            self.iterations += 1
            if self._on_iteration is not None:
                self._on_iteration(engine, touched, time.perf_counter() - t0)
            self._publish(touched)

    def _die(self, reason: str) -> None:
        """Mark the engine dead and answer every request with an error (streams get a final error delta)."""
        self.dead = reason
        for stream in list(self._streams.values()):
            req = stream.req
            if not req.finished:
                req.finish_reason, req.error = "error", reason
                req.status = Status.FINISHED
        try:
            self._publish([s.req for s in self._streams.values()])
        finally:
            self._drain_commands()

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            if self.dead is not None:
                fut.set_exception(EngineDead(self.dead))
                continue
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:  # validation errors go back to the caller
                fut.set_exception(e)

    def _fail_running(self, engine: Engine, message: str) -> list[Request]:
        failed = list(engine.running)
        for req in failed:
            engine.fail(req.rid, message)
        return failed

    def _publish(self, reqs: Sequence[Request]) -> None:
        for req in reqs:
            stream = self._streams.get(req.rid)
            if stream is None:
                continue
            if req.finished:
                del self._streams[req.rid]  # its last delta goes out now
            text = req.take_text_delta()
            shown = req.take_tokens()  # the tokens of the text shown: a stop string's are never listed
            new = slice(shown.start, shown.stop)
            delta = Delta(
                text=text,
                token_ids=req.output_ids[new],
                logprobs=req.logprobs[new],
                top_logprobs=req.top_logprobs[new],
                finished=req.finished,
                text_offsets=[req.token_start(i) for i in shown],
                finish_reason=req.finish_reason,
                stop_reason=req.stop_reason,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                wants_logprobs=req.params.logprobs is not None,
                error=req.error,
            )
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)
