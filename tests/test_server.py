"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
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


@pytest.mark.parametrize(
    "body,message",
    [
        ("{not json", "not valid JSON"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "gpt-4", "prompt": "hi"}, "does not exist"),
        ({"model": MODEL, "prompt": "hi", "top_p": 5}, "top_p must be in (0, 1]"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"model": MODEL, "prompt": ""}, "empty"),
        (
            {"model": MODEL, "prompt": "hi " * 3000},
            "This model's maximum context length is 2048 tokens. However, you requested",
        ),
        ({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2046}, "(3 in the prompt, 2046 in the completion)"),
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


def test_non_streaming_client_that_gives_up_frees_its_kv(server):
    base, llm = server
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, timeout=2.0)
    assert _wait_idle(llm, timeout=60)
