"""Load Hugging Face model directories: config.json, (sharded) *.safetensors, tokenizer files."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from checkpoints.tokenizer import Tokenizer
from loong_jax.model.config import ModelConfig, RopeScaling
from loong_jax.model.llama import CheckpointError

log = logging.getLogger("loong_jax")
SUPPORTED = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}
_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}
_LAYER_TENSORS = {
    "input_layernorm.weight": "layers.attn_norm.scale",
    "post_attention_layernorm.weight": "layers.mlp_norm.scale",
    "self_attn.q_proj.weight": "layers.attn.wq",
    "self_attn.k_proj.weight": "layers.attn.wk",
    "self_attn.v_proj.weight": "layers.attn.wv",
    "self_attn.o_proj.weight": "layers.attn.wo",
    "self_attn.q_proj.bias": "layers.attn.bq",
    "self_attn.k_proj.bias": "layers.attn.bk",
    "self_attn.v_proj.bias": "layers.attn.bv",
    "mlp.gate_proj.weight": "layers.mlp.w_gate",
    "mlp.up_proj.weight": "layers.mlp.w_up",
    "mlp.down_proj.weight": "layers.mlp.w_down",
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped tensors of one .safetensors file (bfloat16 included, via ml_dtypes)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _rope_scaling(hf: dict[str, Any], path: str) -> RopeScaling:
    rs = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind not in RopeScaling.KINDS:
        raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported; supported: {RopeScaling.KINDS}")
    original = rs.get("original_max_position_embeddings")
    if kind == "dynamic":
        original = hf["max_position_embeddings"]
    return RopeScaling(
        kind=kind,
        factor=float(rs["factor"]),
        original_max_position=original,
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
    )


def read_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e})") from None
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise CheckpointError(f"{cfg_path}: architecture {arch!r} is not supported; supported: {sorted(SUPPORTED)}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{cfg_path}: attention_bias / mlp_bias on Llama layers are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{cfg_path}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    max_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
    if window and window < max_pos:
        # Attention inside the window equals full attention, so the model is exact up to the window length.
        log.warning("%s: sliding window %d is not implemented; context limited to %d", cfg_path, window, window)
        max_pos = window
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(hf, cfg_path),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=SUPPORTED[arch],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos),
        name=os.path.basename(os.path.normpath(path)),
    )


def read_weights(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (other weight formats are not supported)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    arrays: dict[str, np.ndarray] = {}
    per_layer: dict[str, list[np.ndarray | None]] = {}
    for name, w in tensors.items():
        if name == "model.embed_tokens.weight":
            arrays["embed"] = w
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                arrays["lm_head"] = w.T
        elif name == "model.norm.weight":
            arrays["final_norm.scale"] = w
        elif name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            if rest.endswith("rotary_emb.inv_freq"):
                continue
            if rest not in _LAYER_TENSORS:
                raise CheckpointError(f"{path}: unexpected tensor {name}")
            slots = per_layer.setdefault(_LAYER_TENSORS[rest], [None] * cfg.num_layers)
            slots[int(idx)] = w.T if w.ndim == 2 else w
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name}")
    for name, layers in per_layer.items():
        missing = [i for i, x in enumerate(layers) if x is None]
        if missing:
            raise CheckpointError(f"{path}: tensor {name} is missing for layers {missing[:8]}")
        arrays[name] = np.stack(layers)
    return arrays


def _token_str(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def read_tokenizer(path: str, cfg: ModelConfig) -> Tokenizer | None:
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
        return None
    backend = HFTokenizer.from_file(tok_path)
    tc: dict[str, Any] = {}
    tc_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc_path):
        with open(tc_path) as f:
            tc = json.load(f)
    template = tc.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    jinja_path = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    specials = {k: _token_str(tc[k]) for k in ("bos_token", "eos_token") if tc.get(k)}
    eos_ids = list(cfg.eos_token_ids)
    if not eos_ids and specials.get("eos_token"):
        eos_ids = [backend.token_to_id(specials["eos_token"])]
    return Tokenizer(
        backend,
        bos_token_id=cfg.bos_token_id,
        eos_token_ids=eos_ids,
        chat_template=template,
        add_bos=bool(tc.get("add_bos_token", False)),
        special_tokens=specials,
    )


def load_hf_dir(
    path: str, before_weights: Callable[[ModelConfig], None] | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer | None]:
    """Config, weights and tokenizer; `before_weights(config)` may refuse the model before its weights load."""
    cfg = read_config(path)
    if before_weights is not None:
        before_weights(cfg)
    return cfg, read_weights(path, cfg), read_tokenizer(path, cfg)
