"""The on-device sampler against numpy references, and the stop rules end to end on SmolLM2."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from loong_jax import SamplingParams
from loong_jax.model.sampling import _smallest_kept, sample
from loong_jax.runtime.batching import sampler_flags, sampler_inputs
from loong_jax.runtime.request import Request

V = 12


def _reqs(n, **params):
    return [Request(i, [3, 4, 5], SamplingParams(**params), 16, seed=i, eos_ids=(2,)) for i in range(n)]


def _sample(logits, reqs, steps=None):
    flags = sampler_flags(reqs)
    inp = jax.tree.map(lambda x: x[0], sampler_inputs([reqs], len(reqs), flags))
    if steps is not None:
        inp = inp._replace(step=np.asarray(steps, np.int32))
    return jax.device_get(jax.jit(sample, static_argnums=2)(np.asarray(logits, np.float32), inp, flags))


def _freqs(tokens):
    return np.bincount(np.asarray(tokens), minlength=V) / len(tokens)


LOGITS = np.linspace(2.0, -1.0, V).astype(np.float32)


def test_temperature_sampling_follows_softmax():
    n = 4000
    out = _sample(np.tile(LOGITS, (n, 1)), _reqs(n, temperature=0.7))
    expected = np.exp(LOGITS / 0.7) / np.exp(LOGITS / 0.7).sum()
    assert np.abs(_freqs(out.tokens) - expected).max() < 0.03


def test_top_k_top_p_min_p_restrict_the_support():
    n = 2000
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()
    out = _sample(np.tile(LOGITS, (n, 1)), _reqs(n, top_k=3))
    assert set(np.unique(out.tokens)) == {0, 1, 2}
    nucleus = int(np.searchsorted(np.cumsum(probs), 0.6) + 1)
    out = _sample(np.tile(LOGITS, (n, 1)), _reqs(n, top_p=0.6))
    assert set(np.unique(out.tokens)) == set(range(nucleus))
    out = _sample(np.tile(LOGITS, (n, 1)), _reqs(n, min_p=0.5))
    assert set(np.unique(out.tokens)) == set(np.nonzero(probs >= 0.5 * probs.max())[0])


def test_top_k_and_top_p_keep_what_the_sorted_rule_keeps():
    """The bisection threshold keeps, per row, exactly the tokens the sorted-order rule keeps: fewer than k
    more likely tokens, holding less than top_p of the mass (distinct probabilities, so no ties)."""
    rng = np.random.default_rng(1)
    rows, vocab = 64, 3000
    probs = rng.dirichlet(np.full(vocab, rng.choice([0.05, 1.0])), size=rows).astype(np.float32)
    probs[::7, vocab // 2 :] = 0.0  # rows whose tail is already cut (min-p)
    top_k = rng.choice([0, 1, 5, 40, vocab, vocab + 7], size=rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.05, 1e-6], size=rows).astype(np.float32)
    t = np.asarray(jax.jit(_smallest_kept)(probs, top_k, top_p))
    kept = probs.view(np.int32) >= t[:, None]
    for i in range(rows):
        order = np.argsort(-probs[i], kind="stable")
        before = np.cumsum(probs[i][order]) - probs[i][order]
        k = top_k[i] if top_k[i] > 0 else vocab
        rule = (np.arange(vocab) < k) & ((before < top_p[i] * probs[i].sum()) if top_p[i] < 1 else True)
        expected = np.zeros(vocab, bool)
        expected[order[rule & (probs[i][order] > 0)]] = True
        got = kept[i] & (probs[i] > 0)
        assert (got == expected).all(), f"row {i}: k={top_k[i]}, p={top_p[i]}"


def test_greedy_and_top_k_one_agree():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, V))
    greedy = _sample(logits, _reqs(8, temperature=0.0)).tokens
    top1 = _sample(logits, _reqs(8, temperature=1.0, top_k=1)).tokens
    assert (greedy == logits.argmax(-1)).all() and (top1 == greedy).all()


def test_same_seed_same_token_different_step_varies():
    logits = np.tile(np.zeros(V, np.float32), (64, 1))
    a = _sample(logits, _reqs(64), steps=[5] * 64).tokens
    b = _sample(logits, _reqs(64), steps=[5] * 64).tokens
    c = _sample(logits, _reqs(64), steps=[6] * 64).tokens
    assert (a == b).all() and (a != c).any()


def test_penalties_match_reference():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, V)).astype(np.float32) * 3
    reqs = _reqs(1, temperature=0.0, repetition_penalty=1.7, frequency_penalty=0.5, presence_penalty=0.3)
    reqs[0].output_ids = [7, 7, 9]
    ref = logits[0].copy()
    for t in {3, 4, 5, 7, 9}:
        ref[t] = ref[t] / 1.7 if ref[t] > 0 else ref[t] * 1.7
    for t, c in {7: 2, 9: 1}.items():
        ref[t] -= 0.5 * c + 0.3
    assert _sample(logits, reqs).tokens[0] == ref.argmax()
    rng_logits = np.zeros((1, V), np.float32)
    rng_logits[0, 7] = 0.4  # the favourite, but penalised below the others
    assert _sample(rng_logits, reqs).tokens[0] != 7


def test_logprobs_are_the_model_distribution():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, V)).astype(np.float32)
    out = _sample(logits, _reqs(3, temperature=0.0, logprobs=5))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprob, ref[np.arange(3), out.tokens], atol=1e-5)
    np.testing.assert_allclose(out.top_logprobs[:, :5], -np.sort(-ref, axis=-1)[:, :5], atol=1e-5)


def test_min_tokens_bans_eos():
    logits = np.full((1, V), -5.0, np.float32)
    logits[0, 2] = 10.0  # EOS is overwhelmingly likely
    reqs = _reqs(1, temperature=0.0, min_tokens=3)
    assert _sample(logits, reqs).tokens[0] != 2
    reqs[0].output_ids = [5, 6, 7]
    assert _sample(logits, reqs).tokens[0] == 2


def test_min_tokens_bans_stop_token_ids_and_logit_bias_moves_the_choice():
    logits = np.full((1, V), -5.0, np.float32)
    logits[0, 7] = 10.0
    reqs = _reqs(1, temperature=0.0, min_tokens=2, stop_token_ids=[7])
    assert _sample(logits, reqs).tokens[0] != 7  # a stop token before min_tokens would end it too early
    reqs[0].output_ids = [5, 6]
    assert _sample(logits, reqs).tokens[0] == 7
    biased = _reqs(1, temperature=0.0, logit_bias={7: -100.0, 3: 100.0})
    out = _sample(logits, biased)
    assert out.tokens[0] == 3
    assert np.isclose(out.logprob[0], logits[0, 3] - np.log(np.exp(logits[0]).sum()))  # the model's logprob


def test_tiny_temperatures_are_greedy_and_bad_values_are_refused():
    assert SamplingParams(temperature=1e-9).temperature == 0.0
    reqs = _reqs(50, temperature=1e-7)
    assert set(_sample(np.tile(LOGITS, (50, 1)), reqs).tokens.tolist()) == {0}
    for bad in (dict(top_k=2**31), dict(stop_token_ids=[-1]), dict(logit_bias={1: 101}), dict(logit_bias={-2: 1})):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_stop_strings_inside_min_tokens_do_not_count_and_text_is_never_taken_back():
    class Letters:  # one character per token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) if i else "\n" for i in ids)

    from checkpoints.tokenizer import IncrementalDetokenizer

    params = SamplingParams(max_tokens=10, min_tokens=3, stop=["\n"])
    req = Request(0, [1], params, 10, seed=0, eos_ids=(), detok=IncrementalDetokenizer(Letters(), [1], True))
    streamed = ""
    for t in [1, 0, 2, 3, 4, 0, 5]:  # a \n b c d \n e: the first \n is inside min_tokens
        req.append_token(t, 0.0, [])
        streamed += req.take_text_delta()
        if req.finished:
            break
    assert req.finish_reason == "stop" and req.text == "a\nbcd" and streamed == req.text


@pytest.mark.parametrize("include", [False, True])
def test_the_tokens_shown_are_those_of_the_text_shown(include):
    """A stop string that begins inside a token: the tokens listed (streamed or not) are those with text in
    the answer, the last one running past the cut; their start offsets are positions in the text."""
    pieces = {1: "<s>", 2: "ab", 3: "c\n", 4: "\nd", 5: "ef"}

    class Pieces:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(pieces[i] for i in ids)

    from checkpoints.tokenizer import IncrementalDetokenizer

    params = SamplingParams(max_tokens=10, stop=["\n\n"], include_stop_str_in_output=include)
    req = Request(0, [1], params, 10, seed=0, eos_ids=(), detok=IncrementalDetokenizer(Pieces(), [1], True))
    text, shown = "", []
    for t in [2, 3, 4, 5]:
        req.append_token(t, 0.0, [])
        text += req.take_text_delta()
        shown += [(req.output_ids[i], req.token_start(i)) for i in req.take_tokens()]
        if req.finished:
            break
    assert text == req.text == ("abc\n\n" if include else "abc") and req.output_ids == [2, 3, 4]
    assert shown == ([(2, 0), (3, 2), (4, 4)] if include else [(2, 0), (3, 2)])


# ----- end to end on SmolLM2 ------------------------------------------------------------------------

PROMPT = "List the first ten prime numbers, separated by commas:"


def test_stop_strings_truncate_and_report(smol_llm):
    full = smol_llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0))[0]
    stop = full.text[8:11]
    assert stop and stop in full.text
    cut = smol_llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=[stop]))[0]
    at = full.text.index(stop)
    assert cut.text == full.text[:at] and cut.finish_reason == "stop" and cut.stop_reason == stop
    keep = smol_llm.generate(
        PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=[stop], include_stop_str_in_output=True)
    )[0]
    assert keep.text == full.text[: at + len(stop)]


def test_stop_token_ids_and_max_tokens(smol_llm):
    full = smol_llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    target = full.token_ids[5]
    out = smol_llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[target]))[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_seeded_sampling_is_reproducible_across_batches(smol_llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = smol_llm.generate(PROMPT, p)[0].token_ids
    batch = smol_llm.generate([PROMPT, "Tell me a joke.", PROMPT], [p, SamplingParams(max_tokens=5), p])
    assert batch[0].token_ids == alone and batch[2].token_ids == alone
    other = smol_llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99))[0]
    assert other.token_ids != alone


def test_stream_deltas_add_up_to_the_text(smol_llm):
    params = SamplingParams(max_tokens=30, temperature=0)
    deltas = list(smol_llm.stream("Écris une phrase sur Paris 🗼:", params))
    full = smol_llm.generate("Écris une phrase sur Paris 🗼:", params)[0]
    assert "".join(deltas) == full.text and len(deltas) > 3
    assert smol_llm.engine.kv_used_tokens == 0


@pytest.mark.parametrize("n", [0, 3])
def test_logprobs_come_back_per_token(smol_llm, n):
    out = smol_llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=n))[0]
    assert len(out.logprobs) == 6 and all(lp <= 0 for lp in out.logprobs)
    assert all(len(t) == n for t in out.top_logprobs)
    if n:  # greedy: the chosen token is the most likely one
        assert all(max(t, key=t.get) == tok for t, tok in zip(out.top_logprobs, out.token_ids))
