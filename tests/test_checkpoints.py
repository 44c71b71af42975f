"""Checkpoint loading: sharded and bfloat16 safetensors, Orbax round trips, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import save_tiny_hf

pytest.importorskip("torch")

from checkpoints import load_checkpoint  # noqa: E402
from checkpoints.orbax_dir import save  # noqa: E402
from loong_jax.model.llama import CheckpointError, state_to_arrays  # noqa: E402
from loong_jax.runtime.programs import score_program  # noqa: E402

PROMPT = jnp.asarray([5, 9, 13, 2, 40, 41, 7], jnp.int32)


def _logits(ckpt):
    return np.asarray(score_program(ckpt.graphdef, ckpt.state, PROMPT))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-hf"))
    save_tiny_hf(path, seed=3)
    return path


def test_sharded_safetensors_load_the_same_weights(tiny_hf, tmp_path):
    sharded = str(tmp_path / "sharded")
    save_tiny_hf(sharded, seed=3, shard=True)
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    np.testing.assert_array_equal(
        _logits(load_checkpoint(sharded, jnp.float32)), _logits(load_checkpoint(tiny_hf, jnp.float32))
    )


def test_bfloat16_safetensors(tmp_path, tiny_hf):
    import torch

    path = str(tmp_path / "bf16")
    model = save_tiny_hf(path, seed=3)
    model.to(torch.bfloat16).save_pretrained(path)
    ckpt = load_checkpoint(path, jnp.float32)
    ref = load_checkpoint(tiny_hf, jnp.float32)
    assert np.abs(_logits(ckpt) - _logits(ref)).max() < 0.5  # bf16 rounding of the weights only


def test_orbax_round_trip_is_exact(tiny_hf, tmp_path):
    ckpt = load_checkpoint(tiny_hf, jnp.float32)
    out = str(tmp_path / "orbax")
    save(out, ckpt.config, ckpt.state, ckpt.tokenizer)
    again = load_checkpoint(out, jnp.float32)
    assert again.config == ckpt.config
    for name, arr in state_to_arrays(ckpt.state).items():
        np.testing.assert_array_equal(np.asarray(state_to_arrays(again.state)[name]), np.asarray(arr))
    with pytest.raises(CheckpointError, match="not empty"):
        save(out, ckpt.config, ckpt.state, ckpt.tokenizer)


def test_orbax_keeps_the_tokenizer_and_chat_template(smol_llm, tmp_path):
    engine = smol_llm.engine
    out = str(tmp_path / "smol-orbax")
    save(out, smol_llm.config, engine.executor.state, smol_llm.tokenizer)
    again = load_checkpoint(out, jnp.float32)
    msgs = [{"role": "user", "content": "Hi 123"}]
    assert again.tokenizer.apply_chat_template(msgs) == smol_llm.tokenizer.apply_chat_template(msgs)
    assert again.tokenizer.encode("Hi 123 there") == smol_llm.tokenizer.encode("Hi 123 there")


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_errors_name_the_file_and_the_problem(tiny_hf, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing"), jnp.float32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_checkpoint(str(empty), jnp.float32)

    arch = str(tmp_path / "arch")
    shutil.copytree(tiny_hf, arch)
    _edit_config(arch, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"config.json: architecture 'GPT2LMHeadModel' is not supported"):
        load_checkpoint(arch, jnp.float32)

    shape = str(tmp_path / "shape")
    shutil.copytree(tiny_hf, shape)
    _edit_config(shape, intermediate_size=96)
    implied = r"shape: tensor layers.mlp.w_down has shape \(2, 80, 48\), the config implies \(2, 96, 48\)"
    with pytest.raises(CheckpointError, match=implied):
        load_checkpoint(shape, jnp.float32)

    noweights = str(tmp_path / "noweights")
    shutil.copytree(tiny_hf, noweights)
    for f in os.listdir(noweights):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(noweights, f))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(noweights, jnp.float32)

    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="bad.gguf: not a readable GGUF file"):
        load_checkpoint(str(bad_gguf), jnp.float32)
