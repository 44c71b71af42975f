"""Llama-family decoder in Flax NNX.

The model never touches a KV cache itself: each layer computes Q/K/V (RoPE applied) and hands them to an
`attend` function supplied by the caller, together with a carry that is threaded through the layers (a KV
pool that prefill and decode write in place, a buffer that collects every layer's K/V, or nothing).
Prefill, decode and the elastic runtime's distributed programs differ only in the `attend` they pass.
Layer parameters are stacked on a leading axis. Programs run the layers one after another over per-layer
arrays (`unstack_layers`: each matmul reads its weights where they lie, at the cost of compiling every layer)
or, given the stacked arrays, with `lax.scan` (one layer compiled, but each step copies every layer's weights
out of the stack). A buffer in the carry, such as a KV pool, is updated in place as long as it is written
before it is read within a layer.

Inside an instance of several devices (tensor parallelism) the caller passes a `TensorParallel` plan:
attention heads and MLP columns are sharded on its axis and the two row-sharded projections are summed.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from loong_jax.model.config import ModelConfig
from loong_jax.model.rope import apply_rope, rotary_angles


class Attend(Protocol):
    """attend(layer, q [T,H,D], k [T,KV,D], v [T,KV,D], carry) -> (out [T,H,D], carry)."""

    def __call__(
        self, layer: jnp.ndarray, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, carry: Any
    ) -> tuple[jnp.ndarray, Any]: ...


class TensorParallel(NamedTuple):
    """How one instance's devices split a layer: heads and/or MLP columns sharded on `axis`."""

    axis: str
    attention: bool
    mlp: bool


def tensor_parallel_plan(cfg: ModelConfig, tp: int, axis: str = "tp") -> TensorParallel | None:
    """Shard what divides evenly by tp; attention stays replicated when its KV heads do not divide."""
    if tp == 1:
        return None
    heads_ok = cfg.num_kv_heads % tp == 0 and cfg.num_heads % tp == 0
    return TensorParallel(axis, heads_ok, cfg.intermediate_size % tp == 0)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, scale: float = 0.02) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape) * scale).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Q/K/V projections with RoPE, and the output projection; the attention itself is `attend`."""

    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = _param(rngs, (d, h * hd), dtype)
        self.wk = _param(rngs, (d, kv * hd), dtype)
        self.wv = _param(rngs, (d, kv * hd), dtype)
        self.wo = _param(rngs, (h * hd, d), dtype)
        if cfg.qkv_bias:
            self.bq = _param(rngs, (h * hd,), dtype)
            self.bk = _param(rngs, (kv * hd,), dtype)
            self.bv = _param(rngs, (kv * hd,), dtype)

    def qkv(self, x: jnp.ndarray, angles: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        cfg = self.cfg
        q, k, v = x @ self.wq[...], x @ self.wk[...], x @ self.wv[...]
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        t, hd = x.shape[0], cfg.head_dim  # head counts may be this device's share of the heads
        q = apply_rope(q.reshape(t, -1, hd), angles)
        k = apply_rope(k.reshape(t, -1, hd), angles)
        return q, k, v.reshape(t, -1, hd)

    def out(self, o: jnp.ndarray) -> jnp.ndarray:
        return o.reshape(o.shape[0], -1) @ self.wo[...]


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        self.w_gate = _param(rngs, (cfg.hidden_size, cfg.intermediate_size), dtype)
        self.w_up = _param(rngs, (cfg.hidden_size, cfg.intermediate_size), dtype)
        self.w_down = _param(rngs, (cfg.intermediate_size, cfg.hidden_size), dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return (jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])) @ self.w_down[...]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(
        self,
        x: jnp.ndarray,
        angles: jnp.ndarray,
        layer: jnp.ndarray,
        attend: Attend,
        carry: Any,
        tp: TensorParallel | None,
    ) -> tuple[jnp.ndarray, Any]:
        q, k, v = self.attn.qkv(self.attn_norm(x), angles)
        o, carry = attend(layer, q, k, v, carry)
        o = self.attn.out(o)
        x = x + (jax.lax.psum(o, tp.axis) if tp and tp.attention else o)
        m = self.mlp(self.mlp_norm(x))
        x = x + (jax.lax.psum(m, tp.axis) if tp and tp.mlp else m)
        return x, carry


class Llama(nnx.Module):
    """Embedding, a stack of decoder layers, final norm and (tied or untied) LM head."""

    def __init__(self, cfg: ModelConfig, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def hidden_states(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray,
        seq_lens: jnp.ndarray,
        attend: Attend,
        carry: Any = (),
        tp: TensorParallel | None = None,
    ) -> tuple[jnp.ndarray, Any]:
        """Run all layers on a flat token batch [T]; returns pre-norm hidden states [T, hidden] and carry."""
        x = self.embed[...][tokens]
        angles = rotary_angles(self.cfg, positions, seq_lens)
        graphdef, layer_state = nnx.split(self.layers)
        if is_unstacked(layer_state):  # one layer after another, each reading its own arrays in place
            for i in range(self.cfg.num_layers):
                state = jax.tree.map(lambda t, i=i: t[i], layer_state, is_leaf=_is_tuple)
                x, carry = nnx.merge(graphdef, state)(x, angles, jnp.int32(i), attend, carry, tp)
            return x, carry

        def body(x_carry, xs):
            layer_idx, state = xs
            x, carry = x_carry
            return nnx.merge(graphdef, state)(x, angles, layer_idx, attend, carry, tp), None

        (x, carry), _ = jax.lax.scan(body, (x, carry), (jnp.arange(self.cfg.num_layers), layer_state))
        return x, carry

    def logits(self, h: jnp.ndarray) -> jnp.ndarray:
        """Final norm and LM head for the rows of h [N, hidden] that need logits (float32)."""
        h = self.final_norm(h)
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return (h @ w).astype(jnp.float32)


def _is_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and not isinstance(x, P)


def is_unstacked(layer_state: Any) -> bool:
    """Whether a state's layer parameters are tuples of per-layer arrays (see `unstack_layers`)."""
    return _is_tuple(jax.tree.leaves(layer_state, is_leaf=_is_tuple)[0])


def unstack_layers(tree: nnx.State, num_layers: int) -> nnx.State:
    """The layer parameters [L, ...] of a state split into tuples of L arrays (also for trees shaped like a
    state: partition specs, shapes). A program over this layout runs the layers one after another, each
    matmul reading its weights where they lie; scanning over stacked arrays slices each layer's weights out
    of them, a copy of every weight at every step on CPU (and on GPU unless XLA fuses the slice)."""

    def split(x: Any) -> tuple:
        if isinstance(x, P):
            return (P(*x[1:]),) * num_layers
        if isinstance(x, jax.ShapeDtypeStruct):
            return (jax.ShapeDtypeStruct(x.shape[1:], x.dtype),) * num_layers
        host = np.asarray(x) if isinstance(x, np.ndarray) or _on_cpu(x) else x  # views, not copies
        return tuple(host[i] for i in range(num_layers))

    return nnx.State({k: (jax.tree.map(split, v) if k == "layers" else v) for k, v in tree.items()})


def stack_layers(state: nnx.State) -> nnx.State:
    """Inverse of `unstack_layers` for arrays (a copy): the layout checkpoints are written in."""
    if not is_unstacked(state["layers"]):
        return state
    stacked = jax.tree.map(lambda t: jnp.stack(t), state["layers"], is_leaf=_is_tuple)
    return nnx.State({k: (stacked if k == "layers" else v) for k, v in state.items()})


def _on_cpu(x: Any) -> bool:
    return isinstance(x, jax.Array) and all(d.platform == "cpu" for d in x.devices())


def param_partition_specs(cfg: ModelConfig, tp: TensorParallel | None) -> dict[str, tuple]:
    """Per flat parameter name, which dimension (if any) is sharded on the tensor-parallel axis."""
    specs: dict[str, tuple] = {name: (None,) * len(shape) for name, shape in param_shapes(cfg).items()}
    if tp is None:
        return specs
    if tp.attention:
        for name in ("wq", "wk", "wv"):
            specs[f"layers.attn.{name}"] = (None, None, tp.axis)
        for name in ("bq", "bk", "bv"):
            if f"layers.attn.{name}" in specs:
                specs[f"layers.attn.{name}"] = (None, tp.axis)
        specs["layers.attn.wo"] = (None, tp.axis, None)
    if tp.mlp:
        specs["layers.mlp.w_gate"] = (None, None, tp.axis)
        specs["layers.mlp.w_up"] = (None, None, tp.axis)
        specs["layers.mlp.w_down"] = (None, tp.axis, None)
    return specs


def abstract_model(cfg: ModelConfig, dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state, without allocating weights (for loaders)."""
    model = nnx.eval_shape(lambda: Llama(cfg, dtype, nnx.Rngs(0)))
    return nnx.split(model)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the problem."""


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter names ("layers.attn.wq", ...) and shapes; layer parameters carry a leading L axis."""
    _, state = abstract_model(cfg, jnp.float32)
    return {".".join(map(str, path)): tuple(v.shape) for path, v in state.flat_state()}


def state_from_arrays(
    cfg: ModelConfig, dtype: Any, arrays: dict[str, Any], source: str
) -> tuple[nnx.GraphDef, nnx.State]:
    """Build the model state from flat host arrays, checking names and shapes against the config."""
    graphdef, state = abstract_model(cfg, dtype)
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: tensors missing {missing[:8]} / unexpected {extra[:8]}")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(arrays[name].shape)}, the config implies {shape}"
            )
    nested: dict[str, Any] = {}
    for name, arr in arrays.items():
        node = nested
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arr, dtype=dtype)
    state.replace_by_pure_dict(nested)
    return graphdef, state


def state_to_arrays(state: nnx.State) -> dict[str, Any]:
    """Inverse of `state_from_arrays`: flat name -> array."""
    return {".".join(map(str, path)): v[...] for path, v in state.flat_state()}
