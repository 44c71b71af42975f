"""Test helpers: tiny random Hugging Face checkpoints and a naive attention reference."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def save_tiny_hf(path: str, arch: str = "llama", seed: int = 0, shard: bool = False, **overrides: Any) -> Any:
    """Save a tiny random transformers model with save_pretrained; returns the torch model."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    base = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    model = model_cls(config_cls(**base))
    with torch.no_grad():  # default init is tiny; larger weights make mismatches visible
        for p in model.parameters():
            if p.ndim >= 1:
                p.normal_(0.0, 0.2 if p.ndim == 2 else 1.0)
    model = model.eval()
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return model


def naive_attention(q, k, v, q_pos, q_seg, k_pos, k_seg):
    """Full-matrix masked attention in numpy: (out [T,H,D], lse [T,H])."""
    h, kvh = q.shape[1], k.shape[1]
    kk = np.repeat(k, h // kvh, axis=1).astype(np.float64)
    vv = np.repeat(v, h // kvh, axis=1).astype(np.float64)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kk) / np.sqrt(q.shape[-1])
    mask = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] >= 0) & (k_pos[None, :] <= q_pos[:, None])
    s = np.where(mask[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", p / np.where(denom > 0, denom, 1.0), vv)
    lse = np.where(denom[..., 0] > 0, np.log(np.where(denom[..., 0] > 0, denom[..., 0], 1)) + m[..., 0], -np.inf)
    return out, lse.T


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def tiny_dir(tmp_path: Any, name: str) -> str:
    d = os.path.join(str(tmp_path), name)
    os.makedirs(d, exist_ok=True)
    return d


def held_case(rng, held, queries, layers=2, kv_heads=2, heads=4, dim=16, num_slots=1024, dtype=np.float32):
    """An appending prefill's attention to held K/V: a pool, packed queries of len(held) requests (queries[i]
    each, then padding), and the slots each request holds listed in request order (held[i] each, then
    padding and, past `count`, entries that must be ignored). Returns the kernel arguments and the naive
    expectation of every layer: {layer: (out, lse)}."""
    k_pool = rng.standard_normal((layers, kv_heads, num_slots, dim)).astype(dtype)
    v_pool = rng.standard_normal((layers, kv_heads, num_slots, dim)).astype(dtype)
    q_seg = np.concatenate([np.full(n, i) for i, n in enumerate(queries)] + [np.full(5, -1)]).astype(np.int32)
    q = rng.standard_normal((len(q_seg), heads, dim)).astype(dtype)
    count = sum(held)
    width = -(-(count + 40) // 512) * 512
    slots = np.full(width, num_slots, np.int32)
    k_seg = np.full(width, -1, np.int32)
    slots[:count] = rng.permutation(num_slots)[:count]
    k_seg[:count] = np.concatenate([np.full(n, i) for i, n in enumerate(held)])
    slots[count : count + 30] = rng.integers(0, num_slots, 30)  # listed past count: not held
    k_seg[count : count + 30] = 0
    want = {}
    for layer in range(layers):
        k, v = (x[layer][:, slots[:count]].swapaxes(0, 1) for x in (k_pool, v_pool))
        zq, zk = np.zeros(len(q_seg), np.int32), np.zeros(count, np.int32)
        if count:
            want[layer] = naive_attention(q.astype(np.float32), k, v, zq, q_seg, zk, k_seg[:count])
        else:  # nothing held: every row saw no key
            want[layer] = np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    return (q, q_seg, k_pool, v_pool, slots, k_seg, np.int32(count)), want
