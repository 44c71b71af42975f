"""Property-based test of the request schema: a fuzzer (schemathesis) reads the server's own OpenAPI document
and sends generated bodies, valid and invalid, to a real server on loopback. No input may get a 5xx, and no
200 may carry an error."""

from __future__ import annotations

import json

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from loong_jax import LLM  # noqa: E402
from serving.app import build_app  # noqa: E402
from serving.openapi import openapi_document  # noqa: E402
from serving.server import build_server, start_in_thread  # noqa: E402

MODEL = "smollm2"


@pytest.fixture(scope="module")
def fuzz_server():
    """A small context keeps every generated completion short (the examples run the real model)."""
    llm = LLM(num_instances=1, kv_tokens_per_instance=1024, max_model_len=24, max_num_seqs=8, seed=0)
    srv, engine = build_server(llm, MODEL, max_body_bytes=1 << 20)
    url, uv = start_in_thread(build_app(srv, on_shutdown=lambda: engine.shutdown(10)))
    yield url, llm
    uv.should_exit = True


schema = schemathesis.openapi.from_dict(openapi_document())


def test_the_server_publishes_this_document(fuzz_server):
    assert httpx.get(f"{fuzz_server[0]}/openapi.json").json() == json.loads(json.dumps(openapi_document()))


@schemathesis.check
def no_error_in_a_200(ctx, response, case):
    """A 200 never reports a failure inside it (engine errors are 5xx or an error event)."""
    if response.status_code != 200:
        return None
    text = response.text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: {")] or [text]
    for event in events:
        body = json.loads(event)
        if isinstance(body, dict) and (
            "error" in body or any(c.get("finish_reason") == "error" for c in body.get("choices", []))
        ):
            raise AssertionError(f"a 200 carries an error: {event[:300]}")
    return None


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gets_a_5xx_or_a_200_carrying_an_error(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server[0], checks=[not_a_server_error, no_error_in_a_200], timeout=300)
