"""Logits and greedy-continuation parity with Hugging Face transformers on tiny random checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from esp_helpers import FAST_COMPILE
from helpers import save_tiny_hf

torch = pytest.importorskip("torch")

from checkpoints import load_checkpoint  # noqa: E402
from loong_jax import LLM, SamplingParams  # noqa: E402
from loong_jax.runtime.programs import score_program  # noqa: E402

CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa3-tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "qwen2-bias": dict(arch="qwen2", num_attention_heads=6, num_key_value_heads=2),
    "mistral": dict(arch="mistral", num_attention_heads=8, num_key_value_heads=2, sliding_window=None),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=32),
    "rope-llama3": dict(
        head_dim=8,
        num_attention_heads=6,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ),
}


def test_sliding_window_limits_the_context(tmp_path):
    save_tiny_hf(str(tmp_path), arch="mistral", sliding_window=64)
    assert load_checkpoint(str(tmp_path), jnp.float32).config.max_position_embeddings == 64


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, name):
    kwargs = dict(CASES[name])
    hf = save_tiny_hf(str(tmp_path), seed=len(name), **kwargs)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 96, size=40).tolist()

    ckpt = load_checkpoint(str(tmp_path), jnp.float32)
    ours = np.asarray(score_program(ckpt.graphdef, ckpt.state, jnp.asarray(prompt, jnp.int32)))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3

    llm = LLM(
        str(tmp_path),
        kv_tokens_per_instance=1024,
        page_size=4,
        compilation_cache_dir=None,
        compiler_options=FAST_COMPILE,
    )
    out = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    hf.generation_config.eos_token_id = None  # ignore_eos: EOS may be chosen and generation goes on
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, pad_token_id=0)
    hf_ids = hf_ids[0, len(prompt) :].tolist()
    assert out.token_ids == hf_ids
