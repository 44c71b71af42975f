"""The elastic runtime: what runs on the devices and the host state that mirrors it.

Instances and group meshes (`instances.py`), the per-instance KV pools and their page allocators
(`kv_pool.py`), the striped ring prefill with in-ring scale-down, multi-master decode and migration as
`shard_map` programs (`programs.py`), their host-side inputs and placement plans (`placement.py`,
`batching.py`), the work items and the executor interface (`work.py`), the JAX executor with its program
cache (`jax_executor.py`, `program_cache.py`), memory sizing (`memory.py`), a request's host-side state
(`request.py`) and platform set-up (`platform.py`).

Imports only `loong_jax.model` and `pallas_kernels` below it; it never decides anything (that is the
scheduling layer's job): it runs the layout it is given.
"""
