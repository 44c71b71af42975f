"""Shared fixtures: the real SmolLM2 model (ours and the transformers reference) and tiny HF checkpoints."""

from __future__ import annotations

import os
import tempfile

import jax
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so a run that passed passes again (a new draw that
# fails is found on purpose, not by CI): HYPOTHESIS_PROFILE=explore draws new examples.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Tests schedule with the built-in rough cost model, not a profile fitted on the machine running them.
os.environ["LOONG_PROFILE_DIR"] = tempfile.mkdtemp(prefix="loong-profiles-")

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)  # virtual instances for the elastic runtime


@pytest.fixture(scope="session", autouse=True)
def _default_model_loaded_once():
    """Every in-process LLM of the default model shares one read of its GGUF file (4 s each otherwise; the
    weights are only copied from it). Loading itself is tested in test_checkpoints.py."""
    import checkpoints

    load, loaded = checkpoints.load_checkpoint, {}

    def load_once(path, dtype):
        if path is not None:
            return load(path, dtype)
        key = str(dtype)
        if key not in loaded:
            loaded[key] = load(None, dtype)
        return loaded[key]

    checkpoints.load_checkpoint = load_once
    yield
    checkpoints.load_checkpoint = load


def pytest_collection_modifyitems(config, items):
    """Tests that measure a fresh process's memory run first, while this process holds little."""
    items.sort(key=lambda item: item.get_closest_marker("fresh_host") is None)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from checkpoints import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_llm():
    """SmolLM2-135M-Instruct on the engine (shared so its compiled programs are reused)."""
    from loong_jax import LLM

    return LLM(kv_tokens_per_instance=16384, max_num_seqs=8, seed=0)


@pytest.fixture(scope="session")
def hf_smol(smollm2_path):
    """The transformers reference model, loaded from the same GGUF file."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smol_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
