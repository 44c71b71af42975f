"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
from loong_jax import LLM  # noqa: E402
from serving.app import build_app  # noqa: E402
from serving.server import build_server, start_in_thread  # noqa: E402

MODEL = "smollm2"


@pytest.fixture(scope="module")
def server():
    llm = LLM(  # memory_utilization: this test process already holds other models
        num_instances=4,
        kv_tokens_per_instance=4096,
        max_num_seqs=64,
        max_model_len=2048,
        seed=0,
        memory_utilization=0.9,
    )
    srv, engine = build_server(llm, MODEL, api_key=None)
    url, uv = start_in_thread(build_app(srv, on_shutdown=lambda: engine.shutdown(10)))
    yield url, llm
    uv.should_exit = True


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
    kv = httpx.get(f"{base}/v1/models").json()["data"][0]["kv_cache"]
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
        ({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}}, "response_format is not"),
        ({"model": MODEL, "prompt": "hi", "tools": [{"type": "function"}]}, "tools is not supported"),
        ('{"model": "smollm2", "prompt": "a \\ud800 b"}', "not valid Unicode"),
        ('{"prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ({"model": MODEL, "prompt": ""}, "empty"),
        (
            {"model": MODEL, "prompt": "hi " * 3000},
            "This model's maximum context length is 2048 tokens. However, you requested",
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
    with pytest.raises(ValueError, match="cannot hold one request of max_model_len=2,048"):
        LLM(num_instances=1, kv_tokens_per_instance=256, max_model_len=2048, seed=0)
    llm = LLM(num_instances=1, kv_tokens_per_instance=256, max_model_len=240, seed=0)
    srv, engine = build_server(llm, MODEL, api_key="secret")
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
        "loong:kv_cache_tokens_per_instance 4096.0",
        "loong:kv_cache_capacity_tokens 16384.0",
        'loong:kv_cache_sizing_info{budget_bytes="',
    ):
        assert name in text, name


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
    srv, engine = build_server(llm, MODEL, api_key=None, max_body_bytes=4000)
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
