"""Orbax checkpoints of any loaded model: fast reloads without dequantising or re-reading safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from checkpoints.tokenizer import Tokenizer
from loong_jax.model.config import ModelConfig
from loong_jax.model.llama import CheckpointError, abstract_model

MARKER = "loong_config.json"


def is_orbax_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER))


def save(path: str, cfg: ModelConfig, state: Any, tokenizer: Tokenizer | None) -> None:
    """Write config, tokenizer and weights (Orbax) into a new directory `path`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise CheckpointError(f"{path}: the output directory exists and is not empty")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "state"), state.to_pure_dict())
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        for name, text in tokenizer.to_files().items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"config": cfg.to_dict(), "format": 1}, f, indent=1)


def restore(
    path: str, dtype: Any, before_weights: Callable[[ModelConfig], None] | None = None
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State, Tokenizer | None]:
    """Restore a directory written by `save` (weights cast to dtype): config, graph, state and tokenizer;
    `before_weights(config)` may refuse the model before its weights load."""
    path = os.path.abspath(path)
    with open(os.path.join(path, MARKER)) as f:
        cfg = ModelConfig.from_dict(json.load(f)["config"])
    if before_weights is not None:
        before_weights(cfg)
    graphdef, state = abstract_model(cfg, dtype)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), state.to_pure_dict())
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)
    except Exception as e:  # orbax raises many kinds of errors for damaged or mismatched checkpoints
        raise CheckpointError(f"{path}: cannot restore the Orbax state ({type(e).__name__}: {e})") from None
    state.replace_by_pure_dict(restored)
    tokenizer = None
    tj, meta = os.path.join(path, "tokenizer.json"), os.path.join(path, "loong_tokenizer.json")
    if os.path.exists(tj) and os.path.exists(meta):
        with open(tj) as f1, open(meta) as f2:
            tokenizer = Tokenizer.from_files(f1.read(), f2.read())
    return cfg, graphdef, state, tokenizer
