"""A launch's inputs travel to the device as one packed buffer and come out exactly as they went in."""

from __future__ import annotations

import jax
import numpy as np
from esp_helpers import tiny_esp_engine

from loong_jax import SamplingParams
from loong_jax.runtime.packing import layout, pack, pack_device, unpack


def test_pack_and_unpack_give_back_every_array_bit_for_bit():
    rng = np.random.default_rng(0)
    tree = {
        "tokens": rng.integers(-5, 1 << 30, (3, 4)).astype(np.int32),
        "live": rng.random((3, 4)) < 0.5,
        "seed": rng.integers(0, 1 << 32, (3, 4, 2), dtype=np.uint64).astype(np.uint32),
        "temperature": np.array([[0.0, -0.0, np.inf, np.nan]] * 3, np.float32),
        "empty": np.zeros((3, 4, 0), np.int32),
    }
    spec = layout(tree)
    words = pack(tree)
    assert words.shape == (3, 4 + 4 + 8 + 4) and words.dtype == np.uint32
    back = jax.jit(lambda w: unpack(w, spec))(words)
    again = jax.jit(lambda w: pack_device(unpack(w, spec)))(words)
    for name, x in tree.items():
        assert back[name].dtype == x.dtype and back[name].shape == x.shape
        assert np.asarray(back[name]).tobytes() == x.tobytes(), name
    assert np.array_equal(np.asarray(again), words)


def test_a_decode_launch_makes_one_transfer(monkeypatch):
    engine = tiny_esp_engine(num_instances=1, kv_tokens=256, limits={"max_model_len": 128, "decode_steps": 1})
    req = engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    while len(req.output_ids) < 2:  # compiled and running
        engine.step()
    calls = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: calls.append(a) or real(*a, **k))
    launches = engine.stats.decode_launches
    while engine.has_unfinished():
        engine.step()
    assert engine.stats.decode_launches > launches
    assert len(calls) == engine.stats.decode_launches - launches
