"""Static model configuration shared by the model, the loaders and the runtime."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as found in real checkpoints.

    kind is one of "default", "linear", "dynamic" (NTK-aware), "llama3".
    """

    kind: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    KINDS = ("default", "linear", "dynamic", "llama3")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unsupported rope scaling type {self.kind!r}; supported: {', '.join(self.KINDS)}")
        if self.kind != "default" and self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and self.original_max_position is None:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-family decoder hyper-parameters (hashable: used as a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def context_limit(self) -> int:
        """Longest sequence the model supports (dynamic NTK scaling extends the trained context)."""
        if self.rope_scaling.kind == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling.factor)
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def tiny_config(**overrides: Any) -> ModelConfig:
    """A few-layer random configuration for tests of the mechanisms."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        name="tiny",
    )
    base.update(overrides)
    return ModelConfig(**base)
