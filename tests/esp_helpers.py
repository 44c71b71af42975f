"""Helpers for the elastic-runtime tests: tiny engines over virtual devices and reference computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax import SamplingParams
from loong_jax.engine import Engine, EngineConfig, build_engine
from loong_jax.model.config import tiny_config
from loong_jax.model.llama import Llama
from loong_jax.runtime.programs import score_program
from pallas_kernels import block_attention

GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny_esp_engine(num_instances=8, tp=1, kv_tokens=512, page_size=4, seed=7, limits=None, **cfg_overrides) -> Engine:
    """An engine over a tiny random model; `limits` overrides EngineConfig fields."""
    cfg = tiny_config(**cfg_overrides)
    graphdef, state = nnx.split(Llama(cfg, jnp.float32, nnx.Rngs(seed)))
    fields = dict(max_model_len=512, max_num_seqs=16, max_prefill_tokens=512)
    fields.update(limits or {})
    ecfg = EngineConfig(
        num_instances=num_instances, tp=tp, kv_tokens_per_instance=kv_tokens, page_size=page_size, **fields
    )
    return build_engine(cfg, graphdef, state, None, ecfg, jnp.float32, seed=0)


def reference_logprobs(engine: Engine, prompt: list[int]) -> np.ndarray:
    """log-softmax of the single-device model's logits after the last prompt token."""
    ex = engine.executor
    logits = np.asarray(score_program(ex.graphdef, jax.device_get(ex.state), jnp.asarray(prompt, jnp.int32)))
    last = logits[-1].astype(np.float64)
    return last - np.log(np.exp(last - last.max()).sum()) - last.max()


def reference_kv(engine: Engine, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """K and V [L, T, KV, D] of every prompt token, computed on one device."""
    ex = engine.executor
    model = nnx.merge(ex.graphdef, jax.device_get(ex.state))
    cfg = engine.cfg
    t = len(prompt)
    pos, seg = jnp.arange(t, dtype=jnp.int32), jnp.zeros(t, jnp.int32)
    shape = (cfg.num_layers, t, cfg.num_kv_heads, cfg.head_dim)

    def attend(layer, q, k, v, carry):
        ks, vs = carry
        return block_attention(q, k, v, pos, seg, pos, seg)[0], (ks.at[layer].set(k), vs.at[layer].set(v))

    _, (ks, vs) = model.hidden_states(
        jnp.asarray(prompt, jnp.int32), pos, jnp.full((t,), t, jnp.int32), attend, (jnp.zeros(shape), jnp.zeros(shape))
    )
    return np.asarray(ks), np.asarray(vs)


def pool_tokens(engine: Engine, instance: int, rid: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V [L, n, KV, D] that an instance holds for a request, in its fill order."""
    slots = engine.pools[instance].slots(rid)
    pools = engine.executor.instances.pools[instance]
    return np.asarray(pools.k)[0][:, :, slots].swapaxes(1, 2), np.asarray(pools.v)[0][:, :, slots].swapaxes(1, 2)


def smollm2_on_8_instances(max_model_len: int = 4096):
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
