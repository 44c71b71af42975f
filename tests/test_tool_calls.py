"""Tool-call formats of each model family: the forcing grammar accepts exactly the calls its parser reads
back, streamed text (in pieces of any size) gives the calls the whole text gives, and what is not a complete
well-formed call stays content."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loong_jax.model.sampling import StructuredOutput
from loong_jax.structured import GrammarCompiler
from loong_jax.structured.tools import FORMATS, check_tools, format_for_template

TOOLS = check_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                    "required": ["city", "days"],
                    "additionalProperties": False,
                },
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ]
)
CALLS = [("get_weather", {"city": "Paris", "days": 2}), ("now", {})]


def written(fmt, calls) -> str:
    """Calls as a model of the family writes them."""
    objs = [{"name": n, fmt.args_key: a} for n, a in calls]
    if fmt.name == "mistral":
        return fmt.open + json.dumps(objs)
    return fmt.separator.join(fmt.open + json.dumps(o) + fmt.close for o in objs)


@pytest.fixture(scope="module")
def compiler():
    from checkpoints.load import load_checkpoint

    ckpt = load_checkpoint(None, "float32")
    return ckpt.tokenizer, GrammarCompiler(ckpt.tokenizer, ckpt.config.vocab_size, ckpt.tokenizer.eos_token_ids)


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_the_forcing_grammar_takes_what_the_parser_reads(compiler, family):
    tokenizer, grammars = compiler
    fmt = FORMATS[family]
    for parallel, calls in ((True, CALLS), (False, CALLS[:1])):
        text = written(fmt, calls)
        matcher = grammars.matcher(StructuredOutput(grammar=fmt.grammar(TOOLS, parallel)))
        for token in tokenizer.encode(text, add_special_tokens=False):
            matcher.consume(token)  # raises if the grammar refuses it
        parser = fmt.parser()
        content, found = parser.feed(text)
        rest, more = parser.finish()
        assert (content + rest).strip() == ""
        assert [(c.name, json.loads(c.arguments)) for c in found + more] == calls
    bad = written(fmt, [("get_weather", {"city": "Paris"})])  # a required argument missing
    matcher = grammars.matcher(StructuredOutput(grammar=fmt.grammar(TOOLS, False)))
    with pytest.raises(ValueError, match="refused"):
        for token in tokenizer.encode(bad, add_special_tokens=False):
            matcher.consume(token)


@given(cuts=st.lists(st.integers(1, 9), min_size=1, max_size=60), family=st.sampled_from(sorted(FORMATS)))
@settings(max_examples=60, deadline=None)
def test_streamed_pieces_give_the_calls_and_text_of_the_whole(cuts, family):
    fmt = FORMATS[family]
    text = written(fmt, CALLS) if family != "hermes" else "Let me check.\n" + written(fmt, CALLS) + "\nDone <b>."
    whole = fmt.parser()
    w_content, w_calls = whole.feed(text)
    w_rest, w_more = whole.finish()
    stream, content, calls, at = fmt.parser(), "", [], 0
    for n in [*cuts, len(text)]:
        piece, at = text[at : at + n], at + n
        c, k = stream.feed(piece)
        content, calls = content + c, calls + k
    c, k = stream.finish()
    content, calls = content + c, calls + k
    assert content == w_content + w_rest
    assert [(x.name, x.arguments) for x in calls] == [(x.name, x.arguments) for x in w_calls + w_more]
    assert len(calls) == 2


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_separators_and_markers_inside_arguments_do_not_split_calls(family):
    fmt = FORMATS[family]
    calls = [("get_weather", {"city": 'Paris; "France" {x}] </tool_call>', "days": 2}), ("now", {})]
    for pieces in ([written(fmt, calls)], written(fmt, calls)):  # whole, then a character at a time
        parser, content, found = fmt.parser(), "", []
        for piece in pieces:
            c, k = parser.feed(piece)
            content, found = content + c, found + k
        rest, more = parser.finish()
        assert content + rest == ""
        assert [(c.name, json.loads(c.arguments)) for c in found + more] == calls


@pytest.mark.parametrize(
    "family,text",
    [
        ("hermes", 'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),  # cut by max_tokens
        ("hermes", "<tool_call>\nnot json\n</tool_call>"),
        ("llama3_json", '{"city": "Paris"}'),  # JSON, but not a call
        ("mistral", "[TOOL_CALLS] nothing"),
        ("hermes", "The weather is fine; use < and > freely."),
    ],
)
def test_what_is_not_a_whole_call_stays_content(family, text):
    parser = FORMATS[family].parser()
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    assert content + rest == text and not calls + more


def test_families_from_templates_and_tool_checks():
    assert format_for_template("{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert format_for_template("<|python_tag|>{{ tools }}").name == "llama3_json"
    assert format_for_template("<tool_call>").name == "hermes" and format_for_template(None).name == "hermes"
    assert format_for_template(None, "mistral").name == "mistral"
    with pytest.raises(ValueError, match="one of hermes, llama3_json, mistral"):
        format_for_template(None, "xml")
    for tools, message in (
        ([], "non-empty list"),
        ([{"type": "function", "function": {"name": "a b"}}], "letters, digits"),
        ([{"type": "function", "function": {"name": "f"}}] * 2, "given twice"),
        ([{"type": "code_interpreter"}], "must be {'type': 'function'"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema object"),
    ):
        with pytest.raises(ValueError, match=message):
            check_tools(tools)
