"""End-to-end checks on the real SmolLM2-135M-Instruct weights against Hugging Face transformers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loong_jax import SamplingParams  # noqa: E402
from loong_jax.runtime.programs import score_program  # noqa: E402

CORPUS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "Tabs\tand\nnewlines\n\nand   multiple   spaces",
    "Unicode: café, naïve, Straße, 東京, Москва, emoji 🙂🚀",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>",
    "It's they're we've I'm you'll he'd",
    "URLs like https://example.com/path?q=a&b=c#frag",
    "Mixed CASE and punctuation!!! ??? ... ---",
]


def test_logits_match_transformers_gguf(smol_llm, hf_smol):
    ids = smol_llm.tokenizer.encode("The history of the Roman Empire begins with the founding of")
    engine = smol_llm.engine
    ours = np.asarray(score_program(engine.executor.graphdef, engine.executor.state, jnp.asarray(ids, jnp.int32)))
    with torch.no_grad():
        ref = hf_smol(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_continuation_matches_transformers(smol_llm, hf_smol):
    prompt = smol_llm.chat_prompt_ids([{"role": "user", "content": "Write a short poem about the sea."}])
    out = smol_llm.generate(prompt, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf_smol.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=48, min_new_tokens=48)
    assert out.token_ids == ref[0, len(prompt) :].tolist()


def test_chat_answers_coherently(smol_llm):
    out = smol_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=32, temperature=0)
    )[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.usage.completion_tokens == len(out.token_ids)


@pytest.mark.parametrize("text", CORPUS)
def test_tokenizer_matches_transformers(smol_llm, hf_smol_tokenizer, text):
    ours = smol_llm.tokenizer.encode(text)
    assert ours == hf_smol_tokenizer.encode(text, add_special_tokens=False)
    assert smol_llm.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_tokenizer_splits_digits_like_llama_cpp(smol_llm):
    """llama.cpp's 'smollm' pre-tokenizer (and the original tokenizer.json) splits digits one by one."""
    tok = smol_llm.tokenizer
    ids = tok.encode("in 2024 there were 365 days")
    pieces = [tok.decode([i]) for i in ids]
    assert [p.strip() for p in pieces if p.strip().isdigit()] == list("2024365")
    assert tok.decode(ids) == "in 2024 there were 365 days"


def test_chat_template_matches_transformers(smol_llm, hf_smol_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    ours = smol_llm.tokenizer.apply_chat_template(messages)
    ref = hf_smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
