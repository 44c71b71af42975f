"""Load llama-architecture GGUF files (llama.cpp's format): config, dequantised weights, tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from checkpoints.tokenizer import Tokenizer, byte_level_bpe, gguf_pre_splits_digits
from loong_jax.model.config import ModelConfig, RopeScaling
from loong_jax.model.llama import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2")
_LAYER_TENSORS = {
    "attn_norm.weight": "layers.attn_norm.scale",
    "ffn_norm.weight": "layers.mlp_norm.scale",
    "attn_q.weight": "layers.attn.wq",
    "attn_k.weight": "layers.attn.wk",
    "attn_v.weight": "layers.attn.wv",
    "attn_output.weight": "layers.attn.wo",
    "attn_q.bias": "layers.attn.bq",
    "attn_k.bias": "layers.attn.bk",
    "attn_v.bias": "layers.attn.bv",
    "ffn_gate.weight": "layers.mlp.w_gate",
    "ffn_up.weight": "layers.mlp.w_up",
    "ffn_down.weight": "layers.mlp.w_down",
}


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> half-split)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_config(reader: gguf.GGUFReader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHS}")

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{path}: metadata key {arch}.{key} is missing")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    scaling = RopeScaling()
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(_field(reader, f"{arch}.rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise CheckpointError(f"{path}: rope scaling {scaling_type!r} is not supported in GGUF files")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qkv_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(_field(reader, "general.name", os.path.basename(path))),
    )


def read_tokenizer(reader: gguf.GGUFReader, path: str) -> Tokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    try:
        split_digits = gguf_pre_splits_digits(_field(reader, "tokenizer.ggml.pre", "default"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    backend = byte_level_bpe(
        tokens,
        list(_field(reader, "tokenizer.ggml.merges")),
        list(_field(reader, "tokenizer.ggml.token_type")),
        split_digits,
    )
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    specials = {}
    if bos is not None:
        specials["bos_token"] = tokens[bos]
    if eos is not None:
        specials["eos_token"] = tokens[eos]
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=[] if eos is None else [int(eos)],
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        special_tokens=specials,
    )


def read_weights(reader: gguf.GGUFReader, cfg: ModelConfig, path: str) -> dict[str, np.ndarray]:
    """Dequantised float32 weights in the model's layout ([in, out] matrices, layers stacked)."""
    per_layer: dict[str, list[np.ndarray | None]] = {}
    arrays: dict[str, np.ndarray] = {}
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            arrays["embed"] = w
        elif name == "output.weight":
            arrays["lm_head"] = w.T
        elif name == "output_norm.weight":
            arrays["final_norm.scale"] = w
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_TENSORS:
                raise CheckpointError(f"{path}: unexpected tensor {name}")
            if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
                heads = cfg.num_heads if rest == "attn_q.weight" else cfg.num_kv_heads
                w = _unpermute(w, heads)
            if w.ndim == 2:
                w = w.T
            slots = per_layer.setdefault(_LAYER_TENSORS[rest], [None] * cfg.num_layers)
            slots[int(idx)] = w
        elif name == "rope_freqs.weight":
            raise CheckpointError(f"{path}: per-frequency rope factors (rope_freqs) are not supported")
    for name, layers in per_layer.items():
        if any(x is None for x in layers):
            raise CheckpointError(f"{path}: tensor {name} is missing for some layers")
        arrays[name] = np.stack(layers)
    return arrays


def load_gguf(
    path: str, before_weights: Callable[[ModelConfig], None] | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Config, weights and tokenizer; `before_weights(config)` may refuse the model before its weights load."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = read_config(reader, path)
    if before_weights is not None:
        before_weights(cfg)
    return cfg, read_weights(reader, cfg, path), read_tokenizer(reader, path)
