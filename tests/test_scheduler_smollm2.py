"""The elastic scheduler driving SmolLM2 on 8 virtual instances: mixed lengths arriving over time, exact output."""

from __future__ import annotations

from pathlib import Path

from esp_helpers import greedy_params

from loong_jax import LLM
from loong_jax.scheduling.elastic import ElasticScheduler

STEPS = 8
LENGTHS = [10, 2000, 40, 450, 1100, 150, 900, 17]  # tokens per prompt, in arrival order


def _prompts(tokenizer) -> list[list[int]]:
    """Natural-text prompts of the given lengths, cut from this repository's own sources."""
    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in sorted(root.glob("loong_jax/**/*.py")))
    ids = tokenizer.encode(text)
    assert len(ids) > sum(LENGTHS)
    out, at = [], 0
    for n in LENGTHS:
        out.append(ids[at : at + n])
        at += n
    return out


def test_scheduler_serves_mixed_lengths_exactly(smol_llm):
    llm = LLM(  # memory_utilization: this test process already holds other models
        num_instances=8,
        kv_tokens_per_instance=1024,
        max_num_seqs=8,
        max_prefill_tokens=4096,
        max_model_len=4096,
        seed=0,
        memory_utilization=0.9,
    )
    engine = llm.engine
    assert isinstance(engine.policy, ElasticScheduler)
    prompts = _prompts(llm.tokenizer)
    reqs = []
    for wave in (prompts[:3], prompts[3:6], prompts[6:]):  # arrivals over time, between engine steps
        reqs += [engine.add_request(p, greedy_params(STEPS)) for p in wave]
        for _ in range(3):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    refs = smol_llm.generate(prompts, greedy_params(STEPS))
    for p, r, ref in zip(prompts, reqs, refs):
        assert r.finish_reason == "length"
        assert r.output_ids == ref.token_ids, f"{len(p)}-token prompt diverged"
    s = engine.stats
    assert max(s.prefill_degrees) > 1 and s.scale_downs >= 1, "the scheduler never used an elastic group"
    assert engine.kv_used_tokens == 0 and not engine.launches
