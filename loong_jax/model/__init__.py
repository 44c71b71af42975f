"""The model: a Llama-family decoder in Flax NNX (`llama.py`), its configuration (`config.py`), rotary
position embeddings (`rope.py`) and the sampling parameters with the on-device sampler (`sampling.py`).

The bottom layer: it imports nothing else of loong_jax. The model never touches a KV cache; the runtime
hands each layer an `attend` function, so the same network runs in every distributed program.
"""
