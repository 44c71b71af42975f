"""Structured outputs with the real SmolLM2: JSON schemas, regular expressions, choices and grammars keep the
sampled output inside them (sampling at temperature 0.7), invalid constraints are refused before anything is
queued, and the other rows of a batch are sampled as if no row were constrained."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import BaseModel, Field

from loong_jax import SamplingParams, StructuredOutput
from loong_jax.engine import RequestRejected


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    pets: list[str] = Field(max_length=3)


ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and pets."}]


@pytest.fixture(scope="module")
def llm(smol_llm):
    return smol_llm


def _chat(llm, messages, **kw):
    return llm.chat(messages, SamplingParams(**kw))[0]


def test_json_schema_outputs_validate_at_temperature(llm):
    spec = StructuredOutput(json_schema=Person)
    assert spec.json_schema["additionalProperties"] is False  # a pydantic model's schema is closed
    params = [SamplingParams(max_tokens=120, temperature=0.7, seed=s, structured_output=spec) for s in range(4)]
    outs = llm.generate([llm.chat_prompt_ids(ASK)] * 4, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        Person.model_validate_json(out.text)  # parses, and every field keeps to its bounds
    again = _chat(llm, ASK, max_tokens=120, temperature=0.7, seed=2, structured_output=spec)
    assert again.text == outs[2].text  # seeded: reproducible


def test_regex_choice_and_grammar(llm):
    regex = r"(yes|no), because [a-z ]{3,30}\."
    out = _chat(llm, ASK, max_tokens=40, temperature=0.7, seed=1, structured_output=StructuredOutput(regex=regex))
    assert re.fullmatch(regex, out.text) and out.finish_reason == "stop"
    colors = ["red", "green", "light blue"]
    out = _chat(llm, ASK, max_tokens=10, temperature=0.7, seed=3, structured_output={"choice": colors})
    assert out.text in colors
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    out = _chat(llm, ASK, max_tokens=20, temperature=0.7, seed=4, structured_output=StructuredOutput(grammar=grammar))
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", out.text)


def test_json_object_cut_by_max_tokens_ends_with_length(llm):
    out = _chat(llm, ASK, max_tokens=6, temperature=0, structured_output=StructuredOutput(json_object=True))
    assert out.finish_reason == "length" and out.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_unconstrained_rows_of_a_batch_are_untouched(llm):
    """Constrained and unconstrained requests in one batch (the sampler's mask variant for all): the
    unconstrained greedy ones give exactly what they give alone."""
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in ("Name a fruit.", "Count to five.")]
    alone = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    constrained = SamplingParams(max_tokens=40, temperature=0, structured_output=StructuredOutput(json_schema=Person))
    plain = SamplingParams(max_tokens=12, temperature=0)
    outs = llm.generate([prompts[0], llm.chat_prompt_ids(ASK), prompts[1]], [plain, constrained, plain])
    assert [outs[0].token_ids, outs[2].token_ids] == alone


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "Invalid type: strin"),
        ({"json_schema": {"type": "string", "format": "no-such-format"}}, "Unknown format"),
        ({"regex": "a(b"}, "unclosed group"),
        ({"grammar": "start: foo"}, "grammar"),
    ],
)
def test_invalid_constraints_are_refused_before_queueing(llm, spec, message):
    with pytest.raises(RequestRejected, match=re.escape(message)):
        llm.engine.add_request([1, 2, 3], SamplingParams(structured_output=spec))
    assert not llm.engine.waiting


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"structured_output": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
        ({"structured_output": {"choice": []}}, "choice must be a non-empty list"),
        ({"structured_output": {"json_schema": 5}}, "json_schema must be a JSON schema"),
        ({"structured_output": {"regex": "a"}, "min_tokens": 2}, "min_tokens must be unset"),
        ({"structured_output": {"regex": "a"}, "ignore_eos": True}, "ignore_eos must be unset"),
    ],
)
def test_malformed_structured_output_parameters(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)
