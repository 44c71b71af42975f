"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
from loong_jax import LLM  # noqa: E402
from serving.access import Access  # noqa: E402
from serving.app import Server, build_app  # noqa: E402
from serving.server import build_server, start_in_thread  # noqa: E402

MODEL = "smollm2"


@pytest.fixture(scope="module")
def served():
    """The module's server: its URL, the LLM and the routes' state (other apps may share its engine)."""
    llm = LLM(  # memory_utilization: this test process already holds other models
        num_instances=4,
        kv_tokens_per_instance=4096,
        max_num_seqs=64,
        max_model_len=2048,
        seed=0,
        memory_utilization=0.9,
    )
    srv, engine = build_server(llm, MODEL)
    url, uv = start_in_thread(build_app(srv, on_shutdown=lambda: engine.shutdown(10)))
    yield url, llm, srv
    uv.should_exit = True


@pytest.fixture(scope="module")
def server(served):
    return served[:2]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=300)


def _wait_idle(llm, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        e = llm.engine
        if not e.has_unfinished() and e.kv_used_tokens == 0:
            return True
        time.sleep(0.05)
    return False


def test_models_health_tokenize(server, client):
    base, llm = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(f"{base}/v1/models/" + "x" * 10_000)
    assert missing.status_code == 404 and len(missing.content) < 1000
    assert "kv_cache" not in httpx.get(f"{base}/v1/models").json()["data"][0]  # operator details: /server_info
    kv = httpx.get(f"{base}/server_info").json()["kv_cache"]
    assert kv["tokens_per_instance"] == 4096 and kv["total_tokens"] == 4 * 4096 and kv["num_instances"] == 4
    assert kv["how"] == "given (kv_tokens_per_instance)" and kv["bytes_per_instance"] == 4096 * kv["bytes_per_token"]
    assert kv["budget_bytes"] > kv["in_use_bytes"] > 0 and kv["weight_bytes"] > 0 and kv["temp_bytes"] > 0
    r = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world"})
    assert r.json()["tokens"] == llm.tokenizer.encode("Hello world")
    r = httpx.post(f"{base}/detokenize", json={"tokens": r.json()["tokens"]})
    assert r.json()["prompt"] == "Hello world"


def test_completion_and_chat(client, server):
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.choices[0].text.strip() and c.usage.completion_tokens <= 8
    assert c.usage.prompt_tokens == len(server[1].tokenizer.encode("The capital of France is"))
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


def test_streaming_usage_equals_tokens_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        logprobs=True,
        stream_options={"include_usage": True},
    )
    text, tokens, usage = "", 0, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            tokens += len(ch.logprobs.content) if ch.logprobs else 0
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to ten."}], max_tokens=20, temperature=0
    )
    assert text == full.choices[0].message.content
    assert usage.completion_tokens == tokens == full.usage.completion_tokens


def test_n_stop_and_seed(client):
    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0, seed=7)
    again = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0, seed=7
    )
    assert [x.text for x in c.choices] == [x.text for x in again.choices]
    assert sorted(x.index for x in c.choices) == [0, 1, 2] and len({x.text for x in c.choices}) > 1
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    stop = full.choices[0].text[4:7]
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_64_concurrent_streams_all_complete(server):
    base, llm = server

    async def one(client, i):
        body = {
            "model": MODEL,
            "prompt": "Tell me something about the number " + str(i) + "." * (i % 7) * 30,
            "max_tokens": 4 + i % 13,
            "temperature": 0.7,
            "seed": i,
            "stream": True,
        }
        ids, n_chunks, finish = set(), 0, None
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                ids.add(chunk["id"])
                n_chunks += 1
                finish = chunk["choices"][0]["finish_reason"] or finish
        return ids, n_chunks, finish

    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(len(ids) == 1 and n > 0 and finish in ("length", "stop") for ids, n, finish in results)
    assert len({next(iter(ids)) for ids, _, _ in results}) == 64
    assert _wait_idle(llm)


def test_disconnecting_clients_free_their_kv(server):
    base, llm = server
    before = _finished(base)

    async def leave_early(client, i):
        body = {"model": MODEL, "prompt": f"Write a long essay about topic {i}.", "max_tokens": 500, "stream": True}
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # got a token: hang up mid-stream

    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(leave_early(client, i) for i in range(20)))

    assert all(asyncio.run(main()))
    assert _wait_idle(llm, timeout=60)
    deadline = time.time() + 30
    while _finished(base) < before + 20 and time.time() < deadline:  # metrics see an abort just after the engine
        time.sleep(0.05)
    assert _finished(base) == before + 20  # every hang-up counted (a short answer may have ended first)


def _finished(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("loong:request_success_total"))


@pytest.mark.parametrize(
    "body,message",
    [
        ("{not json", "not valid JSON"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "prompt": "hi", "top_p": 5}, "top_p: Input should be less than or equal to 1"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"model": MODEL, "prompt": "hi", "top_k": 2**31}, "top_k: Input should be less than or equal to 2147483647"),
        ({"model": MODEL, "prompt": "hi", "seed": 2**63}, "seed: Input should be less than or equal to"),
        ({"model": MODEL, "prompt": "hi", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"model": MODEL, "prompt": "hi", "seed": 2**63 - 1, "n": 2}, "seed must be an integer in [0, 2**63)"),
        ({"model": MODEL, "prompt": "hi", "priority": 2**40}, "priority: Input should be less than or equal to"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"999999": 5}}, "logit_bias token ids must be in [0, 49152)"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias keys must be token ids"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1000}}, "numbers in [-100, 100]"),
        ({"model": MODEL, "prompt": "hi", "stop_token_ids": [10**12]}, "stop_token_ids must be a list of token ids"),
        ({"model": MODEL, "prompt": "hi", "stop_token_ids": [49152]}, "stop_token_ids must be in [0, 49152)"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens must be at most max_tokens"),
        ({"model": MODEL, "prompt": "hi", "response_format": {"type": "xml"}}, "response_format type must be"),
        (
            {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            'json_schema needs {"json_schema"',
        ),
        (
            {
                "model": MODEL,
                "prompt": "hi",
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            },
            "invalid or unsupported json_schema for a structured output: Invalid type: strin",
        ),
        ({"model": MODEL, "prompt": "hi", "guided_regex": "a(b"}, "unclosed group"),
        ({"model": MODEL, "prompt": "hi", "guided_regex": "a", "guided_choice": ["b"]}, "one structured output at"),
        ({"model": MODEL, "prompt": "hi", "structured_outputs": {"xml": "a"}}, "structured_outputs takes one of"),
        ({"model": MODEL, "prompt": "hi", "tools": [{"type": "function"}]}, "tools (on chat completions only)"),
        ('{"model": "smollm2", "prompt": "a \\ud800 b"}', "not valid Unicode"),
        ('{"prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ({"model": MODEL, "prompt": ""}, "empty"),
        (
            {"model": MODEL, "prompt": "hi " * 3000},
            "This model's maximum context length is 2048 tokens, but the prompt has 3001: a prompt may have at most",
        ),
        ({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2046}, "(3 in the prompt, 2046 in the completion)"),
        ({"model": MODEL, "prompt": "word " * 400_000}, "the prompt has at least 24692 tokens"),
        ({"model": MODEL, "prompt": "hi", "n": 100}, "n"),
    ],
)
def test_bad_input_gets_400_and_queues_nothing(server, body, message):
    base, llm = server
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{base}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert not llm.engine.waiting


def test_api_key_and_a_small_pool(tmp_path):
    """A small pool serves the context it can hold; longer requests are refused at once (own server)."""
    small = dict(num_instances=1, kv_tokens_per_instance=256, seed=0, memory_utilization=0.9)  # beside other models
    with pytest.raises(ValueError, match="cannot hold one request of max_model_len=2,048"):
        LLM(max_model_len=2048, **small)
    llm = LLM(max_model_len=240, **small)
    srv, engine = build_server(llm, MODEL, Access(api_keys=("secret",)))
    from starlette.testclient import TestClient

    with TestClient(build_app(srv, on_shutdown=lambda: engine.shutdown(5))) as tc:
        assert tc.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
        auth = {"Authorization": "Bearer secret"}
        r = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1000}, headers=auth)
        assert r.status_code == 400 and "maximum context length is 240" in r.json()["error"]["message"]
        ok = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}, headers=auth)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def test_metrics_report_the_elastic_engine(server, client):
    client.completions.create(model=MODEL, prompt="Metrics please", max_tokens=4, temperature=0)
    text = httpx.get(f"{server[0]}/metrics").text
    for name in (
        "loong:time_to_first_token_seconds_count",
        "loong:e2e_request_latency_seconds_count",
        "loong:num_requests_running",
        'loong:kv_cache_usage_perc_instance{instance="3"}',
        "loong:prompt_tokens_total",
        "loong:generation_tokens_total",
        "loong:prefill_group_degree_bucket",
        "loong:decode_group_degree_bucket",
        "loong:scale_downs_total",
        "loong:migrations_total",
        "loong:decode_launches_total",
        "loong:decode_launches_chained_total",
        "loong:kv_cache_tokens_per_instance 4096.0",
        "loong:kv_cache_capacity_tokens 16384.0",
        'loong:kv_cache_sizing_info{budget_bytes="',
        "loong:prefix_cache_host_hit_tokens_total",
        "loong:prefix_cache_host_loaded_bytes_total",
        "loong:prefix_cache_host_stored_bytes_total",
        "loong:prefix_cache_host_load_seconds_total",
        "loong:prefix_cache_host_pages",
    ):
        assert name in text, name
    capacity = re.search(r"^loong:prefix_cache_host_capacity_bytes (\S+)$", text, re.M)
    assert capacity and float(capacity.group(1)) > 0  # on by default, sized from the host memory left


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_non_streaming_client_that_gives_up_frees_its_kv_and_logs_no_traceback(server):
    base, llm = server
    seen = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "loong_jax.serving", "loong_jax")]
    for lg in loggers:
        lg.addHandler(seen)
    try:
        body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 1000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json=body, timeout=2.0)
        assert _wait_idle(llm, timeout=60)
        time.sleep(0.5)
    finally:
        for lg in loggers:
            lg.removeHandler(seen)
    assert not [r for r in seen.records if r.exc_info or r.levelno >= logging.ERROR], seen.records


def test_unknown_model_is_404_and_unexpected_routes_errors_are_json(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    for path in ("/tokenize", "/v1/chat/completions"):
        body = '{"model": "smollm2", "prompt": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}'
        r = httpx.post(f"{base}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    r = httpx.get(f"{base}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_logprob_offsets_and_token_bytes(server, client):
    base, llm = server
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.text_offset) == len(lp.tokens) == 6 and lp.text_offset[0] == 0
    assert all(lp.text_offset[i + 1] == lp.text_offset[i] + len(lp.tokens[i]) for i in range(5))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say café in Japanese."}], "max_tokens": 12}
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "temperature": 0, "logprobs": True, "top_logprobs": 1})
    content = r.json()["choices"][0]["logprobs"]["content"]
    raw = b"".join(bytes(t["bytes"]) for t in content)
    assert raw.decode("utf-8", "replace") == r.json()["choices"][0]["message"]["content"]
    ids = llm.tokenizer.encode(r.json()["choices"][0]["message"]["content"], add_special_tokens=False)
    assert [llm.tokenizer.token_bytes(i) for i in ids] == [bytes(t["bytes"]) for t in content][: len(ids)]


def test_logit_bias_is_applied_and_tiny_temperatures_are_greedy(client, server):
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    tiny = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=1e-7)
    assert tiny.choices[0].text == greedy.choices[0].text
    tok = server[1].tokenizer
    first = tok.encode(greedy.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logit_bias={str(first): -100}
    )
    assert tok.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    forced = tok.encode(" banana", add_special_tokens=False)[0]
    pushed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert tok.encode(pushed.choices[0].text, add_special_tokens=False) == [forced] * 3


def test_min_tokens_never_cuts_text_already_streamed(server):
    base, llm = server
    newline = llm.tokenizer.encode("\n", add_special_tokens=False)[0]
    body = {"model": MODEL, "prompt": "List:\n1.", "max_tokens": 24, "temperature": 0, "min_tokens": 12}
    for extra in ({"stop": ["\n"]}, {"stop_token_ids": [newline]}):
        streamed = ""
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, **extra, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0]["text"]
        whole = httpx.post(f"{base}/v1/completions", json={**body, **extra}).json()
        assert whole["choices"][0]["text"] == streamed  # nothing streamed was cut afterwards
        assert whole["usage"]["completion_tokens"] >= 12


def test_engine_failures_are_errors_and_a_dead_engine_answers_everyone():
    """One request's failing program: 500 (or an error event) for it alone. Then the engine thread dies:
    requests in flight are answered, /health and every API route say 503 with the reason."""
    llm = LLM(num_instances=1, kv_tokens_per_instance=1024, max_model_len=512, max_num_seqs=4, seed=0)
    poison = llm.tokenizer.encode(" POISONED", add_special_tokens=False)
    real = llm.engine.executor.prefill

    def prefill(work, pools):
        if any(poison[0] in r.prompt_ids for r in work.requests):
            raise RuntimeError("injected: this program cannot run")
        return real(work, pools)

    llm.engine.executor.prefill = prefill
    srv, engine = build_server(llm, MODEL, max_body_bytes=4000)
    url, uv = start_in_thread(build_app(srv, on_shutdown=lambda: engine.shutdown(5)))
    try:
        ok = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        bad = {**ok, "prompt": "Hello POISONED"}
        r = httpx.post(f"{url}/v1/completions", json=bad, timeout=120)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "injected" in r.json()["error"]["message"]
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**bad, "stream": True}, timeout=120) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0])["error"]["code"] == 500 and events[-1] == "[DONE]"
        assert not any('"finish_reason": "error"' in e for e in events)
        assert httpx.post(f"{url}/v1/completions", json=ok, timeout=120).status_code == 200
        assert httpx.post(f"{url}/v1/completions", content=b"x" * 5000).status_code == 413

        long = {**ok, "max_tokens": 400, "ignore_eos": True}

        def stream():
            with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=120) as s:
                return [line[6:] for line in s.iter_lines() if line.startswith("data: ")]

        def two_in_flight_then(error):
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                plain = pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=120)
                streamed = pool.submit(stream)
                deadline = time.time() + 120
                while len(llm.engine.running) < 2 and time.time() < deadline:
                    time.sleep(0.02)
                real_step = llm.engine.step

                def broken(timeout=None):
                    llm.engine.step = real_step
                    raise error

                llm.engine.step = broken
                return plain.result(timeout=120), streamed.result(timeout=120)

        # An unexpected error in one iteration fails the requests running then; the engine goes on.
        r, events = two_in_flight_then(RuntimeError("injected: one iteration failed"))
        assert r.status_code == 500 and "injected: one iteration failed" in r.json()["error"]["message"]
        assert json.loads(events[-2])["error"]["code"] == 500 and events[-1] == "[DONE]"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=ok, timeout=120).status_code == 200

        class Crash(BaseException):  # escapes every handler: the engine thread stops
            pass

        r, events = two_in_flight_then(Crash("injected: the engine thread died"))
        assert r.status_code == 503 and "injected: the engine thread died" in r.json()["error"]["message"]
        assert json.loads(events[-2])["error"]["code"] == 503 and events[-1] == "[DONE]"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "injected" in health.json()["reason"]
        later = httpx.post(f"{url}/v1/completions", json=ok)
        assert later.status_code == 503 and later.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{url}/v1/models").status_code == 503
        assert httpx.get(f"{url}/metrics").status_code == 200
    finally:
        uv.should_exit = True


# ----- tenants, keys and the prefix cache as an oracle ---------------------------------------------------------

BANK = (
    "You are the help desk of the Northwind Savings Bank. Answer the customer's questions about accounts, cards, "
    "transfers and opening hours politely and briefly, and never give financial advice."
)
AFTER_PIN = (
    ". Confirm it with the customer before any change to the account, never read it aloud, never write it in an "
    "email, and remind the customer that the bank will never ask for it on the telephone or in a text message."
)


def _pin_prompt(pin: str) -> str:
    return f"{BANK} The customer PIN is {pin}{AFTER_PIN}"


def _cached(url: str, pin: str, headers: dict | None = None, salt: str | None = None) -> int:
    body = {"model": MODEL, "prompt": _pin_prompt(pin), "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers or {}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def _oracle(url: str, victim: dict, attacker: dict, secret: str) -> tuple[int, int]:
    """What an attacker's cached_tokens say about the victim's PIN: (cached for a wrong guess, for the right
    one), both after the attacker has warmed its own namespace with another wrong guess."""
    _cached(url, secret, **victim)
    _cached(url, "0000", **attacker)
    return _cached(url, "1" + secret[1:], **attacker), _cached(url, secret, **attacker)


@contextlib.contextmanager
def _another_app(served, access: Access):
    """A second server on loopback with other access rules, over the module server's engine."""
    _, llm, srv = served
    other = Server(srv.engine, llm.tokenizer, MODEL, srv.metrics, access)
    url, uv = start_in_thread(build_app(other))
    try:
        yield url
    finally:
        uv.should_exit = True


def test_the_prefix_cache_is_an_oracle_only_within_one_cache_salt(served):
    """Without salts a client learns another's PIN from cached_tokens (the attack this guards against);
    with different salts it learns nothing; the same salt still hits."""
    url = served[0]
    wrong, right = _oracle(url, {}, {}, "4821")
    assert right > wrong  # the oracle: everyone shares one namespace
    wrong, right = _oracle(url, {"salt": "victim"}, {"salt": "attacker"}, "7390")
    assert right == wrong > 0  # the attacker only hits its own pages
    assert _cached(url, "7390", salt="victim") >= len(served[1].tokenizer.encode(_pin_prompt("7390"))) - 16


def test_api_keys_isolate_tenants_and_guard_operator_routes(served):
    access = Access(api_keys=("key-a", "key-b"), admin_key="ops", cache_isolation="api-key")
    a, b = {"Authorization": "Bearer key-a"}, {"authorization": "bearer key-b"}  # schemes in any case
    with _another_app(served, access) as url:
        wrong, right = _oracle(url, {"headers": a}, {"headers": b}, "5163")
        assert right == wrong > 0
        assert _cached(url, "5163", headers={"Authorization": "BEARER key-a"}) > right  # a's own pages
        for headers in ({}, {"Authorization": "Bearer key-c"}, {"Authorization": "Basic key-a"}):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for path in ("/metrics", "/server_info"):  # hit counters and memory: the operator's only
            assert httpx.get(f"{url}{path}", headers=a).status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer ops"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=a).status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401


def test_a_tenant_header_isolates_tenants(served):
    with _another_app(served, Access(cache_isolation="header", tenant_header="X-Tenant")) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 400 and "X-Tenant" in r.json()["error"]["message"]
        wrong, right = _oracle(url, {"headers": {"X-Tenant": "acme"}}, {"headers": {"X-Tenant": "evil"}}, "2958")
        assert right == wrong > 0
        # one tenant's requests still share
        wrong, right = _oracle(url, {"headers": {"X-Tenant": "acme"}}, {"headers": {"X-Tenant": "acme"}}, "3074")
        assert right > wrong


def test_cors_is_off_unless_origins_are_allowed(served):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{served[0]}/v1/completions", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    with _another_app(served, Access(allowed_origins=("https://app.example",))) as url:
        r = httpx.options(f"{url}/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(f"{url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"


# ----- answers that agree with themselves, errors that echo little ------------------------------------------


def _completion_logprobs_agree(choice: dict) -> None:
    """The tokens listed are the text's: each starts where the one before ends, the first at 0, every one
    inside the text, and together they cover it."""
    text, lp = choice["text"], choice["logprobs"]
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert len(tokens) == len(offsets) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert all(at < len(text) for at in offsets)
    assert "".join(tokens).startswith(text)


def test_a_stop_string_cuts_the_tokens_and_offsets_with_the_text(server):
    base, _ = server
    body = {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "logprobs": 1}
    full = httpx.post(f"{base}/v1/completions", json=body).json()["choices"][0]
    stop = full["text"][5:8]
    for extra in ({}, {"include_stop_str_in_output": True}):
        cut = httpx.post(f"{base}/v1/completions", json={**body, **extra, "stop": [stop]}).json()
        choice = cut["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"].startswith(full["text"][:5])
        _completion_logprobs_agree(choice)
        assert len(choice["logprobs"]["tokens"]) < len(full["logprobs"]["tokens"])
        assert cut["usage"]["completion_tokens"] >= len(choice["logprobs"]["tokens"])  # every token sampled
        streaming = {**body, **extra, "stop": [stop], "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=streaming) as r:
            streamed = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        parts = [c["choices"][0] for c in streamed]
        assert "".join(p["text"] for p in parts) == choice["text"]
        assert [t for p in parts for t in p["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
        assert [t for p in parts for t in p["logprobs"]["text_offset"]] == choice["logprobs"]["text_offset"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 24}
    whole = httpx.post(f"{base}/v1/chat/completions", json={**chat, "temperature": 0, "logprobs": True}).json()
    content = whole["choices"][0]["message"]["content"]
    cut = httpx.post(
        f"{base}/v1/chat/completions", json={**chat, "temperature": 0, "logprobs": True, "stop": [content[6:9]]}
    ).json()["choices"][0]
    raw = b"".join(bytes(t["bytes"]) for t in cut["logprobs"]["content"]).decode("utf-8", "replace")
    assert raw.startswith(cut["message"]["content"]) and len(raw) < len(content)


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("/v1/completions", {"prompt": "hi", "model": "m" * 1_000_000}, "does not exist"),
        ("/v1/completions", {"prompt": "hi", "stop": ["x" * 100] * 20_000}, "at most 16 strings"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(49152)}}, "at most 300 entries"),
        ("/v1/completions", {"prompt": "hi", "temperature": "t" * 1_000_000}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "cache_salt": "s" * 100_000}, "cache_salt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c" * 10**6}], "n": 99}, "n: Input"),
        ("/v1/chat/completions", {"messages": [{"role": "u" * 10**6, "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_error_messages_quote_little_of_what_was_sent(server, path, body, message):
    r = httpx.post(f"{server[0]}{path}", json=body, timeout=120)
    assert r.status_code in (400, 404) and message in r.json()["error"]["message"]
    assert len(r.content) < 1500, len(r.content)


@pytest.mark.parametrize(
    "body,message",
    [
        ({"prompt": "hi", "stop": ["x" * 257]}, "stop must be strings of at most 256 characters each"),
        ({"prompt": "hi", "stop": ["x" * 250] * 5}, "at most 1024 characters in all"),
        ({"prompt": [7] * 2048}, "the prompt has 2048: a prompt may have at most 2047, to leave room for"),
        ({"prompt": "hi", "audio": {"voice": "alloy"}}, "audio is not supported"),
        ({"prompt": "hi", "modalities": ["text", "audio"]}, "modalities is not supported"),
        ({"prompt": "hi", "cache_salt": ""}, "cache_salt"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "only text content parts",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "a user message needs content"),
    ],
)
def test_limits_and_unsupported_parts_are_400(server, body, message):
    base, llm = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{base}{path}", json={"model": MODEL, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert not llm.engine.waiting


def test_unknown_fields_are_accepted(client):
    c = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, extra_body={"some_future_field": {"x": 1}, "store": True}
    )
    assert c.usage.completion_tokens <= 2


def test_structured_outputs_over_http(client, server):
    """The official client's parse() with a pydantic model (response_format json_schema, strict), JSON mode,
    and the extension fields; streamed and whole answers keep to the constraint."""
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        population: int = Field(ge=0)

    messages = [{"role": "user", "content": "Give me a city as JSON with its population."}]
    done = client.chat.completions.parse(
        model=MODEL, messages=messages, response_format=City, max_tokens=80, temperature=0.7, seed=5
    )
    assert isinstance(done.choices[0].message.parsed, City) and done.choices[0].finish_reason == "stop"
    paris = [{"role": "user", "content": "Return a JSON object with the keys name and country for Paris."}]
    c = client.chat.completions.create(
        model=MODEL,
        messages=paris,
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0.5,
        seed=2,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    for choice in c.choices:  # each choice its own matcher; log-probabilities of the model's distribution
        assert isinstance(json.loads(choice.message.content), dict), choice
        assert all(x.logprob <= 0 and len(x.top_logprobs) == 2 for x in choice.logprobs.content)
    regex = r"[A-Z][a-z]{2,12}, population [0-9]{3,8}"
    stream = client.completions.create(
        model=MODEL, prompt="A city:", max_tokens=30, stream=True, extra_body={"guided_regex": regex}, seed=1
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch(regex, text), text
    pick = client.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=5, extra_body={"structured_outputs": {"choice": ["tea", "coffee"]}}
    )
    assert pick.choices[0].text in ("tea", "coffee")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 30}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def _valid_call(call) -> tuple[str, dict]:
    """A call's name and arguments, checked against the tool's parameters (required keys, enum, lengths)."""
    args = json.loads(call.function.arguments)
    params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    assert set(args) == set(params["required"]) and call.id and call.type == "function"
    for key, value in args.items():
        spec = params["properties"][key]
        assert isinstance(value, str) and len(value) <= spec["maxLength"] if "maxLength" in spec else True
        assert value in spec.get("enum", [value])
    return call.function.name, args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_parse_validate_and_stream_the_same(client, choice):
    """tool_choice required or named: the call always parses and its arguments validate; the official
    client reassembles from the stream exactly the call it gets whole (same seed)."""
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0.7)
    whole = client.chat.completions.create(seed=11, **kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    calls = [_valid_call(c) for c in whole.message.tool_calls]
    if isinstance(choice, dict):
        assert [name for name, _ in calls] == ["get_time"]
    with client.chat.completions.stream(seed=11, **kw) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [_valid_call(c) for c in streamed.message.tool_calls] == calls


def test_auto_tool_calls_and_a_conversation_with_tool_results(client, server):
    """tool_choice auto (the default with tools): what the model writes in the Hermes format comes back as
    calls, anything else as content; a history with an assistant's calls and the tool's answer is rendered."""
    base, llm = server
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
    choice = answer.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and all(_valid_call(c) for c in choice.message.tool_calls)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
    r = httpx.post(f"{base}/tokenize", json={"messages": messages})
    text = llm.tokenizer.decode(r.json()["tokens"], skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    bad = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "letters, digits"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ]
    for extra, message in bad:
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": messages[:1], **extra})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_the_readme_structured_output_and_tool_call_example_runs(client):
    """The README's example with the official client, as written there (its model name aside)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        text = f.read()
    start = text.index("```python\n", text.index("Structured outputs and tool calls work")) + len("```python\n")
    example = text[start : text.index("```", start)].replace('"SmolLM2-135M-Instruct"', repr(MODEL))
    scope = {"client": client}
    exec(example, scope)
    assert scope["city"].population >= 0 and scope["call"].function.name == "get_weather"
    assert "city" in json.loads(scope["call"].function.arguments)
