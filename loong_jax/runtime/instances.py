"""Elastic instances and their groups.

An instance is one full replica of the weights on `tp` devices, with its own KV pool; instances never
re-shard their weights. A group is any tuple of instances; its mesh has axes ("sp", "tp") built from
exactly those instances' devices, in the group's order. Per-instance buffers are assembled into the
group's global arrays without copies (each device's shard is the instance's own buffer), and a program's
output pools are split back into per-instance buffers the same way.

With several processes (multi-host), each process holds the weights and pools of its own devices'
instances only (the others are None here); a group's arrays are assembled from the shards this process
holds, and only the processes owning devices of a group launch its programs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loong_jax.model.config import ModelConfig
from loong_jax.model.llama import TensorParallel, param_partition_specs, tensor_parallel_plan, unstack_layers
from loong_jax.runtime.kv_pool import KVCache

Group = tuple[int, ...]
SP, TP = "sp", "tp"


class Instances:
    """N instances of tp devices each: their weights, their KV pools, and the meshes of their groups."""

    def __init__(
        self,
        cfg: ModelConfig,
        state: nnx.State,
        *,
        num_instances: int,
        tp: int,
        dtype: Any,
        devices: Sequence[jax.Device] | None = None,
        unstacked: bool = False,
    ):
        """The layout only (devices, meshes, partition specs): nothing is put on the devices until `allocate`.
        unstacked: keep each layer's weights in arrays of their own (`unstack_layers`), so that programs read
        them in place."""
        devices = list(devices if devices is not None else jax.devices())
        if len(devices) < num_instances * tp:
            raise ValueError(
                f"{num_instances} instances x tp={tp} need {num_instances * tp} devices, "
                f"{len(devices)} available (on CPU, call loong_jax.use_virtual_cpu_devices(n) before JAX starts)"
            )
        self.cfg = cfg
        self.n = num_instances
        self.tp = tp
        self.dtype = dtype
        self.num_slots = 0
        self.devices = [tuple(devices[i * tp : (i + 1) * tp]) for i in range(num_instances)]
        self.tp_plan: TensorParallel | None = tensor_parallel_plan(cfg, tp, TP)
        flat_specs = param_partition_specs(cfg, self.tp_plan)
        self.param_specs = _specs_like(state, {k: P(*v) for k, v in flat_specs.items()})
        self.param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        self.unstacked = unstacked
        if unstacked:
            self.param_specs = unstack_layers(self.param_specs, cfg.num_layers)
            self.param_shapes = unstack_layers(self.param_shapes, cfg.num_layers)
        self.kv_tp = bool(self.tp_plan and self.tp_plan.attention)
        self.pool_spec = P(SP, None, TP if self.kv_tp else None, None, None)
        self._meshes: dict[Group, Mesh] = {}
        self._params: dict[Group, Any] = {}
        self.weights: list[Any] = []  # None for an instance of another process
        self.pools: list[KVCache | None] = []
        owners = [{d.process_index for d in row} for row in self.devices]
        if any(len(o) > 1 for o in owners):
            raise ValueError("an instance's tp devices must all belong to one process")
        self.owner = [o.pop() for o in owners]  # the process holding each instance's buffers
        self.local = [p == jax.process_index() for p in self.owner]

    def is_local(self, group: Group) -> bool:
        """Every instance of the group is this process's."""
        return all(self.local[i] for i in group)

    def has_local(self, group: Group) -> bool:
        """Some instance of the group is this process's (so it takes part in the group's programs)."""
        return any(self.local[i] for i in group)

    def allocate(self, state: nnx.State, num_slots: int) -> None:
        """Put a copy of the weights (sharded over its tp devices) and an empty KV pool on every instance."""
        self.num_slots = num_slots
        if self.unstacked:
            state = unstack_layers(state, self.cfg.num_layers)
        for i in range(self.n):
            if not self.local[i]:
                self.weights.append(None)
                self.pools.append(None)
                continue
            shard = jax.tree.map(functools.partial(NamedSharding, self.mesh((i,))), self.param_specs)
            self.weights.append(jax.device_put(state, shard))
            self.pools.append(self._empty_pool(i))

    def _empty_pool(self, i: int) -> KVCache:
        shape, sharding = self._pool_shape(1, self.num_slots), self.sharding((i,), self.pool_spec)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)
        return KVCache(zeros(), zeros())

    def reset_pool(self, i: int) -> None:
        """Replace instance i's KV pool with an empty one (after a failed program left it unusable)."""
        if self.local[i]:
            self.pools[i] = self._empty_pool(i)

    def _pool_shape(self, rows: int, num_slots: int) -> tuple[int, ...]:
        cfg = self.cfg
        return (rows, cfg.num_layers, cfg.num_kv_heads, num_slots, cfg.head_dim)

    def weight_bytes_per_device(self) -> int:
        """Bytes of one device's part of an instance's weights (sharded parameters count 1/tp)."""

        def size(spec: P, x: jax.ShapeDtypeStruct) -> int:
            split = self.tp if TP in jax.tree.leaves(tuple(spec)) else 1
            return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize // split

        return sum(jax.tree.leaves(jax.tree.map(size, self.param_specs, self.param_shapes)))

    def kv_bytes_per_token_per_device(self) -> int:
        """Bytes of one token's K and V (every layer) on one device of its instance."""
        cfg = self.cfg
        heads = cfg.num_kv_heads // self.tp if self.kv_tp else cfg.num_kv_heads
        return 2 * cfg.num_layers * heads * cfg.head_dim * np.dtype(self.dtype).itemsize

    def abstract_params(self, group: Group) -> Any:
        """Shapes and shardings of the group's weights, for compiling without them."""
        mesh = self.mesh(group)
        return jax.tree.map(
            lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
            self.param_specs,
            self.param_shapes,
        )

    def abstract_pools(self, group: Group, num_slots: int) -> KVCache:
        """Shapes and shardings of the group's pools of num_slots slots each, for compiling without them."""
        x = jax.ShapeDtypeStruct(
            self._pool_shape(len(group), num_slots), self.dtype, sharding=self.sharding(group, self.pool_spec)
        )
        return KVCache(x, x)

    def mesh(self, group: Group) -> Mesh:
        """The ("sp", "tp") mesh of a group, rows in the group's order."""
        mesh = self._meshes.get(group)
        if mesh is None:
            if len(set(group)) != len(group) or not all(0 <= i < self.n for i in group):
                raise ValueError(f"a group is distinct instance ids in [0, {self.n}), got {group}")
            grid = np.array([self.devices[i] for i in group], dtype=object).reshape(len(group), self.tp)
            mesh = self._meshes[group] = Mesh(grid, (SP, TP))
        return mesh

    def sharding(self, group: Group, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh(group), spec)

    def group_params(self, group: Group) -> Any:
        """The group's view of the weights (every instance's own copy; cached, weights never change)."""
        params = self._params.get(group)
        if params is None:
            mesh = self.mesh(group)
            per_instance = [self.weights[i] for i in group if self.local[i]]

            def assemble(spec, *leaves):
                return _assemble(leaves[0].shape, NamedSharding(mesh, spec), leaves)

            params = jax.tree.map(assemble, self.param_specs, *per_instance)
            self._params[group] = params
        return params

    def group_pools(self, group: Group) -> KVCache:
        """The group's pools as one [d, L, KV, S, D] array per K and V, built from the instances' buffers."""
        if len(group) == 1:  # an instance's own buffers already are its one-member group's view
            return self.pools[group[0]]
        sharding = self.sharding(group, self.pool_spec)
        local = [self.pools[i] for i in group if self.local[i]]
        shape = (len(group), *local[0].k.shape[1:])
        return KVCache(
            _assemble(shape, sharding, [pool.k for pool in local]),
            _assemble(shape, sharding, [pool.v for pool in local]),
        )

    def put_group_pools(self, group: Group, pools: KVCache) -> None:
        """Give each instance of the group its shard of a program's output pools."""
        if len(group) == 1:
            self.pools[group[0]] = pools
            return
        k_parts, v_parts = _split_rows(pools.k, len(group)), _split_rows(pools.v, len(group))
        for row, i in enumerate(group):
            if not self.local[i]:
                continue
            sharding = self.sharding((i,), self.pool_spec)
            shape = (1, *pools.k.shape[1:])
            self.pools[i] = KVCache(
                jax.make_array_from_single_device_arrays(shape, sharding, k_parts[row]),
                jax.make_array_from_single_device_arrays(shape, sharding, v_parts[row]),
            )


def _assemble(shape: tuple[int, ...], sharding: NamedSharding, leaves: Sequence[jax.Array]) -> jax.Array:
    """A global array over several instances from their own (replicated or row) shards, without copies."""
    shards = [s.data for leaf in leaves for s in leaf.addressable_shards]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _split_rows(x: jax.Array, rows: int) -> list[list[jax.Array]]:
    """Per-row lists of device buffers of an array sharded on its leading ("sp") axis."""
    mesh = x.sharding.mesh
    grid = mesh.devices
    by_device = {s.device: s.data for s in x.addressable_shards}
    return [[by_device.get(dev) for dev in grid[r]] for r in range(rows)]  # None: another process's


def _specs_like(state: nnx.State, flat: dict[str, P]) -> Any:
    """A tree shaped like the state with the partition spec of each parameter at its leaf."""

    def spec(path, _):
        name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return flat[name.removesuffix(".value")]

    return jax.tree_util.tree_map_with_path(spec, state)
