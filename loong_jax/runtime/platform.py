"""Platform set-up: virtual CPU devices, default dtypes and the persistent compilation cache."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "loong_jax", "xla")


def use_virtual_cpu_devices(n: int) -> None:
    """Expose n CPU devices; call before JAX initialises its backend (before any array is created)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    jax.config.update("jax_num_cpu_devices", n)


def default_dtype() -> jnp.dtype:
    """float32 on CPU (bf16 is slower there), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def parse_dtype(name: str | None) -> jnp.dtype:
    if name is None:
        return default_dtype()
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def enable_compilation_cache(path: str | None = DEFAULT_CACHE_DIR) -> None:
    """Persist compiled programs across processes (None disables)."""
    if path is None:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
