"""Helpers for the elastic-runtime tests: tiny engines over virtual devices and reference computations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax import SamplingParams
from loong_jax.engine import Engine, EngineConfig, build_engine
from loong_jax.model.config import tiny_config
from loong_jax.model.llama import Llama
from loong_jax.runtime.work import Iteration, PrefillWork
from pallas_kernels import block_attention

GREEDY = dict(temperature=0.0, ignore_eos=True)
# A tiny model's programs run in microseconds but take about a second each to compile at XLA CPU's default
# LLVM optimisation; tests of tiny models compile them unoptimised (tests/test_esp_decode.py: 153 s -> 77 s
# cold). Not for the real weights: their programs run 1.5x slower so.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_esp_engine(num_instances=8, tp=1, kv_tokens=512, page_size=4, seed=7, limits=None, **cfg_overrides) -> Engine:
    """An engine over a tiny random model; `limits` overrides EngineConfig fields."""
    cfg = tiny_config(**cfg_overrides)
    graphdef, state = nnx.split(Llama(cfg, jnp.float32, nnx.Rngs(seed)))
    fields = dict(max_model_len=512, max_num_seqs=16, max_prefill_tokens=512)
    fields.update(limits or {})
    ecfg = EngineConfig(
        num_instances=num_instances, tp=tp, kv_tokens_per_instance=kv_tokens, page_size=page_size, **fields
    )
    return build_engine(cfg, graphdef, state, None, ecfg, jnp.float32, seed=0, compiler_options=FAST_COMPILE)


def reference_logprobs(engine: Engine, prompt: list[int]) -> np.ndarray:
    """log-softmax of the single-device model's logits after the last prompt token."""
    last = _reference(engine, prompt)[0].astype(np.float64)
    return last - np.log(np.exp(last - last.max()).sum()) - last.max()


def reference_kv(engine: Engine, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """K and V [L, T, KV, D] of every prompt token, computed on one device."""
    _, ks, vs = _reference(engine, prompt)
    return ks, vs


def _reference(engine: Engine, prompt: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last prompt token's logits and every prompt token's K and V, on one device. The prompt is padded
    to a power of two (causal attention: the padding changes nothing before it), so that prompts of many
    lengths share a few compiled programs."""
    ex, cfg, n = engine.executor, engine.cfg, len(prompt)
    tokens = np.zeros(max(16, 1 << (n - 1).bit_length()), np.int32)
    tokens[:n] = prompt
    dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    logits, ks, vs = _reference_program(ex.graphdef, dims, jax.device_get(ex.state), jnp.asarray(tokens), n - 1)
    return np.asarray(logits), np.asarray(ks)[:, :n], np.asarray(vs)[:, :n]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reference_program(graphdef, dims, state, tokens, last):
    model = nnx.merge(graphdef, state)
    layers, kv_heads, head_dim = dims
    t = tokens.shape[0]
    pos, seg = jnp.arange(t, dtype=jnp.int32), jnp.zeros(t, jnp.int32)
    shape = (layers, t, kv_heads, head_dim)

    def attend(layer, q, k, v, carry):
        ks, vs = carry
        return block_attention(q, k, v, pos, seg, pos, seg)[0], (ks.at[layer].set(k), vs.at[layer].set(v))

    h, (ks, vs) = model.hidden_states(tokens, pos, jnp.full((t,), t, jnp.int32), attend, (jnp.zeros(shape),) * 2)
    return model.logits(h[last][None])[0], ks, vs


def pool_tokens(engine: Engine, instance: int, rid: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V [L, n, KV, D] that an instance holds for a request, in its fill order."""
    slots = engine.pools[instance].slots(rid)
    pools = engine.executor.instances.pools[instance]
    return np.asarray(pools.k)[0][:, :, slots].swapaxes(1, 2), np.asarray(pools.v)[0][:, :, slots].swapaxes(1, 2)


def smollm2_on_8_instances(max_model_len: int = 2048):
    """SmolLM2 on 8 virtual instances with small pools (for the elastic runtime on real weights)."""
    from loong_jax import LLM  # noqa: PLC0415

    return LLM(
        num_instances=8,
        kv_tokens_per_instance=1024,
        max_model_len=max_model_len,
        max_num_seqs=8,
        memory_utilization=0.9,  # the test process already holds other models
        seed=0,
        compilation_cache_dir=None,
    )


def greedy_params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **GREEDY, **kw)


def run_to_end(engine: Engine, prompt: list[int], steps: int, group=None, plan=None):
    """One greedy request (log-probabilities too) to its end: through the scheduler, or prefilled on `group`
    with `plan` (then scheduled)."""
    req = engine.add_request(prompt, greedy_params(steps, logprobs=0))
    if group is not None:
        engine.execute(Iteration(prefills=[PrefillWork(group, [req], [np.asarray(plan, np.int32)])]))
    while not req.finished:
        engine.step()
    return req


def evict_all(engine: Engine, rng: np.random.Generator) -> None:
    """Two requests of unrelated tokens, each filling nearly all of each instance's pool in turn: every page
    cached before is evicted (the first leaves the one released last, the second takes it)."""
    n = min(engine.pools[0].num_slots, engine.ecfg.max_model_len) - 1
    for i in range(engine.ecfg.num_instances):
        for _ in range(2):
            run_to_end(engine, rng.integers(3, 256, n).tolist(), 1, (i,), np.zeros(n))
