"""Rotary position embeddings with the scaling variants real checkpoints use.

Rotation follows the Hugging Face ("half-split") convention; GGUF loaders un-permute llama.cpp's Q/K rows
so that one convention serves every checkpoint.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from loong_jax.model.config import ModelConfig


def base_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies, after static (linear / llama3) scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs.kind == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.kind == "llama3":
        old_len = rs.original_max_position
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rotary_angles(cfg: ModelConfig, positions: jnp.ndarray, seq_lens: jnp.ndarray) -> jnp.ndarray:
    """Angles [T, head_dim/2] for tokens at `positions` of requests whose current length is `seq_lens`.

    `seq_lens` only matters for dynamic NTK scaling, where the base grows with the sequence length.
    """
    inv_freq = jnp.asarray(base_inv_freq(cfg))
    pos = positions.astype(jnp.float32)[:, None]
    rs = cfg.rope_scaling
    if rs.kind != "dynamic":
        return pos * inv_freq[None, :]
    dim = cfg.head_dim
    orig = rs.original_max_position or cfg.max_position_embeddings
    length = jnp.maximum(seq_lens.astype(jnp.float32), float(orig))[:, None]
    base = cfg.rope_theta * ((rs.factor * length / orig) - (rs.factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32)[None, :] / dim
    return pos * (1.0 / base**exponents)


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [T, heads, head_dim] by angles [T, head_dim/2] (half-split layout)."""
    cos = jnp.cos(angles)[:, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
