"""The JAX executor: runs group programs on the instances and keeps their pools up to date.

Programs are compiled ahead of time per (kind, group, shape bucket, sampler flags) and cached; a call
returns at once (JAX dispatch is asynchronous) so that programs of disjoint groups run at the same time,
and the engine fetches a launch's sampled tokens once it is ready.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from loong_jax.batching import bucket, sampler_flags, sampler_inputs
from loong_jax.config import ModelConfig
from loong_jax.execution import DecodeWork, Launch, PrefillWork
from loong_jax.instances import SP, Group, Instances
from loong_jax.kv_pool import PagePool
from loong_jax.placement import build_decode, build_prefill
from loong_jax.program_cache import ProgramCache, shape_key
from loong_jax.programs import (
    DecodeInputs,
    MigrateInputs,
    PrefillInputs,
    decode_program,
    migrate_program,
    prefill_program,
)
from loong_jax.request import Request
from loong_jax.sampling import SamplerFlags, SamplerOutputs
from pallas_kernels.reference import DECODE_PAGES_PER_BLOCK


@dataclasses.dataclass
class DevicePending:
    """Sampled tokens of a dispatched program, fetched on demand ([d, rows] per field)."""

    out: Any  # SamplerOutputs of device arrays; empty for programs that sample nothing

    def ready(self) -> bool:
        return all(x.is_ready() for x in jax.tree.leaves(self.out))

    def result(self) -> SamplerOutputs:
        return SamplerOutputs(*(np.asarray(x) for x in jax.device_get(tuple(self.out))))


class JaxExecutor:
    """Owns the instances (weights and KV pools on devices) and the compiled group programs."""

    def __init__(
        self,
        cfg: ModelConfig,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        *,
        num_instances: int,
        tp: int,
        num_pages: int,
        page_size: int,
        max_pages_per_request: int,
        dtype: Any,
        devices: list[jax.Device] | None = None,
        min_prefill_bucket: int = 16,
        max_rows: int = 32,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.min_prefill_bucket = min_prefill_bucket
        self.max_rows = max_rows
        self.graphdef = graphdef
        self.page_size = page_size
        self.num_slots = num_pages * page_size
        self.page_table_width = bucket(max_pages_per_request, DECODE_PAGES_PER_BLOCK)
        self.instances = Instances(
            cfg, state, num_instances=num_instances, tp=tp, num_slots=self.num_slots, dtype=dtype, devices=devices
        )
        self.programs = ProgramCache()
        self.migrations = 0  # KV transfers between instances (migrate calls), for tests and metrics
        self.migrated_tokens = 0

    @property
    def state(self) -> nnx.State:
        """The model weights (instance 0's copy): for scoring, conversion and inspection."""
        return self.instances.weights[0]

    def _common(self, group: Group) -> tuple:
        inst = self.instances
        return (self.graphdef, inst.mesh(group), inst.param_specs, inst.pool_spec, inst.tp_plan)

    def now(self) -> float:
        return time.monotonic()

    def wait(self, launches: Sequence[Launch], timeout: float | None) -> None:
        """Poll until one launch is ready (programs of disjoint groups finish in any order) or time is up."""
        end = None if timeout is None else time.monotonic() + timeout
        while not any(x.pending.ready() for x in launches):
            if end is not None and time.monotonic() >= end:
                return
            time.sleep(0.0005)

    def prefill(self, work: PrefillWork, pools: Sequence[PagePool]) -> Launch:
        """Allocate the kept tokens' slots, lay out the ring inputs and dispatch the group's prefill."""
        if work.chunk is not None or work.piggyback is not None:
            raise NotImplementedError("the JAX executor prefills whole prompts; chunks are simulated only")
        group, requests, plans = work.group, work.requests, work.plans
        plan = build_prefill(
            [r.prefill_ids for r in requests],
            [r.rid for r in requests],
            plans,
            pools,
            min_tokens=self.min_prefill_bucket,
            max_rows=self.max_rows,
        )
        ranks: list[list[Request]] = [[] for _ in group]
        for req, rank in zip(requests, plan.sample_rank):
            ranks[rank].append(req)
        flags = sampler_flags(requests)
        fn = functools.partial(prefill_program, *self._common(group), flags)
        pending = self._run("prefill", group, fn, plan.inputs, sampler_inputs(ranks, plan.rows, flags), flags)
        return Launch("prefill", group, ranks, pending, list(requests))

    def decode(self, work: DecodeWork, pools: Sequence[PagePool]) -> Launch:
        """Reserve each new token's slot at its master, lay out the page tables and dispatch the decode step."""
        group, requests, masters = work.group, work.requests, work.masters
        plan = build_decode(
            [r.rid for r in requests],
            [r.output_ids[-1] for r in requests],
            [r.num_tokens for r in requests],
            masters,
            pools,
            self.page_table_width,
        )
        ranks = [[requests[i] for i in members] for members in plan.rank_requests]
        flags = sampler_flags(requests)
        fn = functools.partial(decode_program, *self._common(group), self.page_size, flags)
        pending = self._run("decode", group, fn, plan.inputs, sampler_inputs(ranks, plan.rows, flags), flags)
        return Launch("decode", group, ranks, pending, list(requests))

    def _run(self, kind: str, group: Group, fn: Any, inp: Any, samp: Any, flags: SamplerFlags) -> DevicePending:
        inst = self.instances
        rows = inst.sharding(group, P(SP))
        inp, samp = jax.device_put((inp, samp), rows)
        args = (inst.group_params(group), inst.group_pools(group), inp, samp)
        key = (kind, group, flags, shape_key((inp, samp)))
        program = self.programs.get(key, fn, args, donate_argnums=(1,))
        out, pools = program(*args)
        inst.put_group_pools(group, pools)
        return DevicePending(out)

    def migrate(self, src: int, dst: int, src_slots: np.ndarray, dst_slots: np.ndarray) -> Launch:
        """Copy K/V at src_slots of instance src into dst_slots of instance dst (padded to a bucket)."""
        n = len(src_slots)
        width = bucket(n, 16)
        inp = MigrateInputs(
            np.full((2, width), self.num_slots, np.int32), np.full((2, width), self.num_slots, np.int32)
        )
        inp.src_slots[0, :n], inp.dst_slots[1, :n] = src_slots, dst_slots
        group = (src, dst)
        inst = self.instances
        inp = jax.device_put(inp, inst.sharding(group, P(SP)))
        args = (inst.group_pools(group), inp)
        fn = functools.partial(migrate_program, inst.mesh(group), inst.pool_spec)
        program = self.programs.get(("migrate", group, shape_key(inp)), fn, args, donate_argnums=(0,))
        pools = jax.block_until_ready(program(*args))  # rare; the next program donates these buffers
        inst.put_group_pools(group, pools)
        self.migrations += 1
        self.migrated_tokens += n
        return Launch("migrate", group, [], DevicePending(()))

    def warmup(self, jobs: Sequence[tuple[str, Group, int, int]], show: bool) -> int:
        """Compile default-sampler programs: (kind, group, tokens or rows per rank, sampled rows) each."""
        before = self.programs.compiles
        for kind, group, size, rows in tqdm(jobs, desc="warming up programs", disable=not show, unit="program"):
            self.compiled(kind, group, size, rows)
        return self.programs.compiles - before

    def compiled(self, kind: str, group: Group, size: int, rows: int) -> Any:
        """The compiled default-sampler program of a kind for a group and per-rank shape (compiles if new)."""
        d, inst, flags = len(group), self.instances, SamplerFlags()
        samp = sampler_inputs([[]] * d, rows, flags)
        z = np.zeros((d, size), np.int32)
        if kind == "prefill":
            keep = np.full((d, d, size), self.num_slots, np.int32)
            inp = PrefillInputs(z, z, z - 1, z + 1, keep, np.zeros((d, rows), np.int32))
            fn = functools.partial(prefill_program, *self._common(group), flags)
        else:
            table = np.zeros((d, d * size, self.page_table_width), np.int32)
            inp = DecodeInputs(z, z, z + self.num_slots, table, np.zeros((d, d * size), np.int32))
            fn = functools.partial(decode_program, *self._common(group), self.page_size, flags)
        inp, samp = jax.device_put((inp, samp), inst.sharding(group, P(SP)))
        args = (inst.group_params(group), inst.group_pools(group), inp, samp)
        return self.programs.get((kind, group, flags, shape_key((inp, samp))), fn, args, donate_argnums=(1,))
