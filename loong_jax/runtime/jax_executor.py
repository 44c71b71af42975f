"""The JAX executor: runs group programs on the instances and keeps their pools up to date.

Programs are compiled ahead of time per (kind, group, shape bucket, sampler flags) and cached; a call
returns at once (JAX dispatch is asynchronous) so that programs of disjoint groups run at the same time,
and the engine fetches a launch's sampled tokens once it is ready.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from loong_jax.model.config import ModelConfig
from loong_jax.model.llama import stack_layers
from loong_jax.model.sampling import VARIANTS, SamplerFlags, SamplerOutputs
from loong_jax.runtime.batching import bucket, sampler_flags, sampler_inputs
from loong_jax.runtime.host_store import PageStore
from loong_jax.runtime.instances import SP, Group, Instances
from loong_jax.runtime.kv_pool import KVCache, PagePool
from loong_jax.runtime.memory import Footprint, count_memory_maps
from loong_jax.runtime.packing import layout, pack, packed_program
from loong_jax.runtime.placement import build_decode, build_prefill
from loong_jax.runtime.program_cache import ProgramCache, shape_key
from loong_jax.runtime.programs import (
    PREFIX_BLOCK,
    DecodeInputs,
    MigrateInputs,
    PrefillInputs,
    decode_program,
    gather_pages_program,
    migrate_program,
    prefill_program,
    scatter_pages_program,
)
from loong_jax.runtime.request import Request
from loong_jax.runtime.work import DecodeWork, Launch, Pending, PrefillWork
from pallas_kernels import attention_backend
from pallas_kernels.reference import DECODE_PAGES_PER_BLOCK

log = logging.getLogger("loong_jax")
MAX_MIGRATE_TOKENS = 1024  # per transfer: bounds its buffers (about 1.5x those tokens' K/V on each side)
MAX_PAGE_BATCH = 64  # pages a host tier save or load moves per program: bounds its buffers and its shapes
# Per pool slot and device: the one temporary that grows with the pool, an appending prefill's list of held
# slots and their rows (two int32 each) unpacked from its inputs; counted with each token's K/V bytes.
HELD_SLOT_BYTES = 8
# Unrolled layers on CPU: XLA's default (concurrency-optimised) schedule keeps the temporaries of many layers
# alive at once (a SmolLM2 2048-token prefill: 192 MB against 63 MB scanned); the memory-optimised one needs
# 43 MB, and on the 2-core machine it also ran 1.15x faster (docs/performance.md).
CPU_UNROLLED_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@dataclasses.dataclass
class DevicePending:
    """Sampled tokens of a dispatched program, fetched on demand ([d, rows] or [d, steps, rows] per field)."""

    out: Any  # SamplerOutputs of device arrays; empty for programs that sample nothing
    watched: bool = False  # the executor is told when it is ready (no need to poll)
    carry: Any = None  # a decode's packed state for a burst that continues it (see run_packed_decode)

    def ready(self) -> bool:
        return all(x.is_ready() for x in jax.tree.leaves(self.out))

    def result(self) -> SamplerOutputs:
        return SamplerOutputs(*(np.asarray(x) for x in jax.device_get(tuple(self.out))))

    def outputs(self) -> Any:
        """The program's outputs as device arrays (of a group that may span processes)."""
        return self.out


@dataclasses.dataclass
class CompilingPending:
    """A program compiled and dispatched on the compile thread (its first use): ready once it has run."""

    future: concurrent.futures.Future  # of the program's SamplerOutputs (device arrays) and carry
    carry: Any = None  # never continued: a burst continues only a program already dispatched

    def ready(self) -> bool:
        if not self.future.done():
            return False
        return self.future.exception() is not None or DevicePending(self.future.result()[0]).ready()

    def result(self) -> SamplerOutputs:
        return DevicePending(self.future.result()[0]).result()  # raises what compiling or running raised

    def outputs(self) -> Any:
        return self.future.result()[0]


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
        page_size: int,
        max_pages_per_request: int,
        dtype: Any,
        devices: list[jax.Device] | None = None,
        min_prefill_bucket: int = 16,
        max_rows: int = 32,
        max_programs: int | None = None,
        attention: str = "auto",
        compiler_options: dict[str, Any] | None = None,
        unroll_layers: bool = False,
    ):
        """The layout only: weights and pools go on the devices in `allocate`, once the pool size is known.
        attention: the attention backend ("auto": Pallas kernels on GPU, XLA elsewhere). compiler_options:
        XLA options for every program (such as a lower LLVM optimisation level: faster compiles, slower code).
        unroll_layers: programs run the layers one after another over per-layer weight arrays (read in place,
        longer compiles) instead of scanning stacked arrays."""
        self.cfg = cfg
        self.dtype = dtype
        self.min_prefill_bucket = min_prefill_bucket
        self.max_rows = max_rows
        self.graphdef = graphdef
        self.page_size = page_size
        self.num_slots = 0
        self.page_table_width = bucket(max_pages_per_request, DECODE_PAGES_PER_BLOCK)
        self.penalty_len = bucket(max_pages_per_request * page_size, 16)  # the ids penalties look at
        self.instances = Instances(
            cfg, state, num_instances=num_instances, tp=tp, dtype=dtype, devices=devices, unstacked=unroll_layers
        )
        platform = self.instances.devices[0][0].platform
        self.attention = attention_backend(attention, platform)
        self._host_state: nnx.State | None = state  # until allocate() copies it to the instances
        if unroll_layers and platform == "cpu":  # XLA CPU's default schedule keeps many layers' temporaries
            compiler_options = {**CPU_UNROLLED_OPTIONS, **(compiler_options or {})}
        self.programs = ProgramCache(max_programs, compiler_options)
        self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loong-compile")
        # Threads that block on dispatched programs and wake `wait`: no polling on the engine loop.
        self._watchers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="loong-watch")
        self._finished = threading.Condition()
        self.migrations = 0  # KV transfers between instances (migrate calls), for tests and metrics
        self.migrated_tokens = 0
        self.peers: Any = None  # multi-host leader: sends operations on groups with other processes' instances
        # Called with a group right before a program that writes its pools is dispatched (the host tier saves
        # the pages their pools just evicted: read before they are overwritten).
        self.before_write: Callable[[Group], None] | None = None
        self._page_programs: dict[tuple[str, int, int], Any] = {}  # (kind, instance, pages) -> compiled
        self.host_store: PageStore | None = None  # the K/V of the host tier of this process's instances
        self._compiling: dict[int, concurrent.futures.Future] = {}  # instance -> its last program compiled on use

    @property
    def devices(self) -> list[jax.Device]:
        """Every instance's devices, instance by instance."""
        return [dev for row in self.instances.devices for dev in row]

    def allocate(self, num_pages: int) -> None:
        """Put the weights and KV pools of num_pages pages on every instance (size them first: `footprint`)."""
        if self._host_state is None:
            raise RuntimeError("the instances are already allocated")
        self.num_slots = num_pages * self.page_size
        self.instances.allocate(self._host_state, self.num_slots)
        self._host_state = None

    def footprint(self, jobs: Sequence[tuple[str, Group, int, int]], num_slots: int | None = None) -> Footprint:
        """Per-device bytes of a weight copy, of a KV token, and of the largest temporaries of the given
        programs, each with the costliest sampler variant (extras: penalties, logit bias, top logprobs), and
        the memory mappings the largest takes. The programs are compiled without any device memory, for a
        pool of num_slots slots (by default the fewest pages past two blocks of held K/V, so that the appending
        prefill runs its loop as with any larger pool: the pools are donated and updated in place, so
        temporaries do not grow with them, but for HELD_SLOT_BYTES per slot, counted per token). The compiled
        programs' host memory is left to the caller, who decides how many to keep."""
        temp = maps = 0
        flags = VARIANTS[-1]
        slots = num_slots or -(-(PREFIX_BLOCK + 1) // self.page_size) * self.page_size
        for kind, group, size, rows in jobs:
            _, fn, args, donate = self._program_args(kind, group, size, rows, flags, slots)
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
            costs = _compile_costs(lowered, self.programs.compiler_options)
            temp, maps = max(temp, costs[0]), max(maps, costs[1])
        inst = self.instances
        per_token = inst.kv_bytes_per_token_per_device() + HELD_SLOT_BYTES
        return Footprint(inst.weight_bytes_per_device(), temp, per_token, 0, maps)

    @property
    def state(self) -> nnx.State:
        """The model weights (instance 0's copy, layers stacked): for scoring, conversion and inspection."""
        return stack_layers(self.instances.weights[0])

    @staticmethod
    def prefix_width(num_slots: int) -> int:
        """Room per rank in a prefill's inputs for the slots of K/V its requests already hold: a whole pool."""
        return -(-num_slots // PREFIX_BLOCK) * PREFIX_BLOCK

    def _common(self, group: Group) -> tuple:
        inst = self.instances
        return (self.graphdef, inst.mesh(group), inst.param_specs, inst.pool_spec, inst.tp_plan, self.attention)

    def now(self) -> float:
        return time.monotonic()

    def wait(self, launches: Sequence[Launch], timeout: float | None) -> None:
        """Return when one launch is ready (programs of disjoint groups finish in any order) or time is up.
        Programs on this process's devices wake it when they finish; others (compiling, on other processes)
        are looked at every half millisecond."""
        end = None if timeout is None else time.monotonic() + timeout
        poll = any(not getattr(x.pending, "watched", False) for x in launches)
        with self._finished:
            while not any(x.pending.ready() for x in launches):
                if self.peers is not None:
                    self.peers.check()  # a lost follower is an error even while only local programs run
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._finished.wait(0.0005 if poll else (0.1 if left is None else min(left, 0.1)))

    def _watched(self, out: Any, carry: Any = None) -> DevicePending:
        """The pending outputs of a program just dispatched: their copy to the host starts now, and a watcher
        thread wakes `wait` when they are ready."""
        for x in jax.tree.leaves(out):
            x.copy_to_host_async()

        def notify(_: Any) -> None:
            with self._finished:
                self._finished.notify_all()

        self._watchers.submit(jax.block_until_ready, out).add_done_callback(notify)
        return DevicePending(out, watched=True, carry=carry)

    def prefill(self, work: PrefillWork, pools: Sequence[PagePool]) -> Launch:
        """Allocate the kept tokens' slots, lay out the ring inputs and dispatch the group's prefill."""
        if work.piggyback is not None:
            raise NotImplementedError("the JAX executor runs no decodes inside a prefill; that is simulated only")
        group, requests = work.group, work.requests
        prompts, plans, starts, sampled = [], [], [], []
        for i, req in enumerate(requests):
            n = req.prefill_len if work.chunk is None else work.chunk[i]
            start = req.prefilled - n  # the engine counted this pass already; a chunk appends to the ones before
            if n < 1:
                raise ValueError(f"request {req.rid}: a prefill pass computes at least one token, got {n}")
            prompts.append(req.prefill_ids[start : start + n])
            plans.append(np.asarray(work.plans[i])[start : start + n])
            starts.append(start)
            sampled.append(start + n >= req.prefill_len)
        plan = build_prefill(
            prompts,
            [r.rid for r in requests],
            plans,
            pools,
            starts=starts,
            totals=[r.prefill_len for r in requests],
            sampled=sampled,
            min_tokens=self.min_prefill_bucket,
            max_rows=self.max_rows,
            prefix_width=self.prefix_width(self.num_slots),
        )
        ranks: list[list[Request]] = [[] for _ in group]
        for req, rank in zip(requests, plan.sample_rank):
            if rank is not None:
                ranks[rank].append(req)
        flags = sampler_flags(requests)
        samp = sampler_inputs(ranks, plan.rows, flags, self.penalty_len, self.cfg.vocab_size)
        pending = self._run("prefill", group, flags, plan.inputs, samp)
        return Launch("prefill", group, ranks, pending, list(requests))

    def can_chain(self, group: Group) -> bool:
        """Whether a decode burst on this group can continue one still running (see `decode`): always (on a
        group spanning processes, each keeps its part of the state and is told which burst to continue)."""
        return True

    def decode(self, work: DecodeWork, pools: Sequence[PagePool], after: Launch | None = None) -> Launch:
        """Reserve the burst's slots at each request's master, lay out the page tables and dispatch it.

        after: a burst of the same work still running, whose tokens the host has not read: this burst starts
        from the state it leaves on the device (last tokens, stopped rows, sampler state) and from the slots
        it reserved as if every row ran all its steps (a row that stopped stays stopped)."""
        group, requests, masters = work.group, work.requests, work.masters
        if after is not None and after.pending.carry is None:
            raise ValueError("this burst cannot continue that one: its state is not on this process's devices")
        ahead = [0] * len(requests) if after is None else [after.reserved[r.rid] for r in requests]
        plan = build_decode(
            [r.rid for r in requests],
            [r.output_ids[-1] for r in requests],
            [r.num_tokens + a for r, a in zip(requests, ahead)],
            masters,
            pools,
            self.page_table_width,
            budgets=[r.max_new_tokens - len(r.output_ids) - a for r, a in zip(requests, ahead)],
            steps=work.steps,
        )
        ranks = [[requests[i] for i in members] for members in plan.rank_requests]
        flags = sampler_flags(requests)
        samp = sampler_inputs(ranks, plan.rows, flags, self.penalty_len, self.cfg.vocab_size)
        carry = None if after is None else after.pending.carry
        pending = self._run("decode", group, flags, plan.inputs, samp, carry)
        reserved = {r.rid: n for r, n in zip(requests, plan.reserved)}
        return Launch("decode", group, ranks, pending, list(requests), work=work, reserved=reserved, follows=after)

    def _run(self, kind: str, group: Group, flags: SamplerFlags, inp: Any, samp: Any, carry: Any = None) -> Pending:
        """Dispatch a prefill or decode on the group; with other processes' instances in it, they are sent
        the same inputs first and the pending outputs gather every process's rows."""
        if self.before_write is not None:  # pages the pools evicted are saved before the program overwrites them
            self.before_write(group)
        if self.peers is None or self.instances.is_local(group):
            return self.run_local(kind, group, flags, inp, samp, carry)
        op = {
            "op": "run",
            "kind": kind,
            "group": list(group),
            "flags": list(flags),
            "inp": list(inp),
            "samp": list(samp),
        }
        if carry is not None:  # a burst continuing another: each process starts from its own part of its state
            op["after"], carry = carry.seq, carry.local
        seq = self.peers.send(op)
        local = self.run_local(kind, group, flags, inp, samp, carry) if self.instances.has_local(group) else None
        return self.peers.gather(seq, kind, group, local)

    def run_local(
        self, kind: str, group: Group, flags: SamplerFlags, inp: Any, samp: Any, carry: Any = None
    ) -> Pending:
        """This process's part of a prefill or decode: dispatch a compiled program at once; one not compiled
        yet (a new sampler variant or shape) is compiled and dispatched on the compile thread, so the
        programs of other groups go on meanwhile. carry: a decode's start state left by the burst before."""
        inst = self.instances
        spec = layout((inp, samp))
        words = jax.device_put(pack((inp, samp)), inst.sharding(group, P(SP)))  # one transfer
        args = (inst.group_params(group), inst.group_pools(group), words)
        if kind == "decode":
            args += (words if carry is None else carry,)
        key = (kind, group, flags, spec)
        program = self.programs.lookup(key)
        if program is not None:
            return self._watched(*self._dispatch(program, group, args))

        def compile_and_dispatch() -> Any:
            fn = packed_program(self._program_fn(kind, group, flags), spec, kind)
            return self._dispatch(self.programs.get(key, fn, args, donate_argnums=(1,)), group, args)

        future = self._compiler.submit(compile_and_dispatch)
        self._compiling.update(dict.fromkeys(group, future))
        return CompilingPending(future)

    def _program_fn(self, kind: str, group: Group, flags: SamplerFlags) -> Any:
        """The prefill or decode program of a group and sampler variant, its inputs left to give."""
        if kind == "prefill":
            return functools.partial(prefill_program, *self._common(group), flags)
        return functools.partial(decode_program, *self._common(group), self.page_size, flags)

    def _dispatch(self, program: Any, group: Group, args: tuple) -> tuple[Any, Any]:
        """Run a program on the group (its pools are donated and replaced by the outputs); returns its samples
        and, for a decode, the state a burst continuing it starts from (else None)."""
        out, pools, *carry = program(*args)
        self.instances.put_group_pools(group, pools)
        return out, (carry[0] if carry else None)

    def migrate(self, src: int, dst: int, src_slots: np.ndarray, dst_slots: np.ndarray) -> Launch:
        """Copy K/V at src_slots of instance src into dst_slots of instance dst, in transfers of at most
        MAX_MIGRATE_TOKENS tokens (padded to a bucket), so that a transfer's buffers stay bounded."""
        group = (src, dst)
        if self.before_write is not None:
            self.before_write(group)
        seq = None
        if self.peers is not None and not self.instances.is_local(group):
            op = {"op": "migrate", "src": src, "dst": dst, "src_slots": src_slots, "dst_slots": dst_slots}
            seq = self.peers.send(op)
        if self.instances.has_local(group):
            self.migrate_local(src, dst, src_slots, dst_slots)
        if seq is not None:
            self.peers.answers(seq, group)  # raises a follower's error
        self.migrations += 1
        self.migrated_tokens += len(src_slots)
        return Launch("migrate", group, [], DevicePending(()))

    def migrate_local(self, src: int, dst: int, src_slots: np.ndarray, dst_slots: np.ndarray) -> None:
        """This process's part of a migration (every transfer runs to completion)."""
        group, inst = (src, dst), self.instances
        for at in range(0, len(src_slots), MAX_MIGRATE_TOKENS):
            part_src = src_slots[at : at + MAX_MIGRATE_TOKENS]
            part_dst = dst_slots[at : at + MAX_MIGRATE_TOKENS]
            n = len(part_src)
            inp = MigrateInputs(*(np.full((2, bucket(n, 16)), self.num_slots, np.int32) for _ in range(2)))
            inp.src_slots[0, :n], inp.dst_slots[1, :n] = part_src, part_dst
            inp = jax.device_put(inp, inst.sharding(group, P(SP)))
            args = (inst.group_pools(group), inp)
            fn = functools.partial(migrate_program, inst.mesh(group), inst.pool_spec)
            program = self.programs.get(("migrate", group, shape_key(inp)), fn, args, donate_argnums=(0,))
            pools = jax.block_until_ready(program(*args))  # rare; the next program donates these buffers
            inst.put_group_pools(group, pools)

    def when_ready(self, x: Any, done: Callable[[], None]) -> None:
        """Call done() on a watcher thread once x is computed (or has failed)."""
        self._watchers.submit(jax.block_until_ready, x).add_done_callback(lambda _: done())

    def can_load(self, instance: int) -> bool:
        """Whether pages can be loaded into an instance's pool now, beside the programs running on it: it is
        this process's and every program on it has been dispatched (one still compiling takes the pool as it
        was when it was launched)."""
        compiling = self._compiling.get(instance)
        return self.instances.local[instance] and (compiling is None or compiling.done())

    def poll_host(self) -> None:
        """File the copies to this process's host tier store that have arrived (freeing their device buffers)."""
        if self.host_store is not None:
            self.host_store.poll()

    def save_pages(self, instance: int, pages: Sequence[int], slots: Sequence[int]) -> None:
        """Copy these pages of an instance's pool into these slots of the host tier store of the process
        owning it: dispatched after every program before it, not waited for (another process's instance: the
        operation is sent to it and not answered; a copy that fails there leaves its slots unreadable)."""
        if self.instances.local[instance]:
            self.save_local(instance, pages, slots)
        else:
            self.peers.send({"op": "save", "group": [instance], "pages": list(pages), "slots": list(slots)})

    def save_local(self, instance: int, pages: Sequence[int], slots: Sequence[int]) -> None:
        """save_pages() of an instance of this process, MAX_PAGE_BATCH pages per program at most."""
        for at in range(0, len(pages), MAX_PAGE_BATCH):
            part = pages[at : at + MAX_PAGE_BATCH]
            gather = self._page_program("gather", instance, len(part))
            k, v = gather(self.instances.pools[instance], self._page_slots(part))
            self.host_store.stage(slots[at : at + MAX_PAGE_BATCH], k, v)

    def load_pages(self, loads: dict[int, tuple[list[int], list[int]]]) -> list[Any]:
        """Write the K/V of host tier slots into pages of instances' pools ({instance: (pages, slots)}, each
        from the store of the process owning the instance): dispatched, not waited for. Returns arrays that are
        ready once the local pages are loaded; other processes are waited for until they have dispatched their
        part (an error there, such as an unreadable slot, is raised here)."""
        if self.before_write is not None:
            self.before_write(tuple(loads))
        remote = [i for i in loads if not self.instances.local[i]]
        seq = None
        if remote:
            op = {"op": "load", "group": remote, "loads": [[i, *map(list, loads[i])] for i in remote]}
            seq = self.peers.send(op)
        done = [self.load_local(i, *loads[i]) for i in loads if self.instances.local[i]]
        if seq is not None:
            self.peers.answers(seq, remote)  # raises a follower's error
        return done

    def load_local(self, instance: int, pages: Sequence[int], slots: Sequence[int]) -> Any:
        """Load one instance's pages of load_pages() from this process's store; returns arrays ready once done.
        The store's memory is handed to the transfer as it is (no copy on the engine loop's thread where the
        slots are consecutive), and the store files no copy into those slots until the load is done."""
        store, inst = self.host_store, self.instances
        sharding = inst.sharding((instance,), inst.pool_spec)
        pool, done = inst.pools[instance], []
        for at, k, v in store.views(slots, MAX_PAGE_BATCH):
            new = KVCache(jax.device_put(k, sharding), jax.device_put(v, sharding))
            scatter = self._page_program("scatter", instance, len(at))
            pool, written = scatter(pool, self._page_slots([pages[j] for j in at]), new)
            done.append(written)
        store.reading(slots, done)
        inst.pools[instance] = pool
        return done

    def _page_slots(self, pages: Sequence[int]) -> np.ndarray:
        """Slots [bucket(n), page] of whole pages; padding rows point past the pool."""
        slots = np.full((bucket(len(pages)), self.page_size), self.num_slots, np.int32)
        slots[: len(pages)] = np.asarray(pages, np.int32)[:, None] * self.page_size + np.arange(self.page_size)
        return slots

    def _page_program(self, kind: str, instance: int, pages: int) -> Any:
        """The compiled program copying a bucket of `pages` pages out of ("gather") or into ("scatter") an
        instance's pool (compiled on first use, or by warm-up)."""
        n = bucket(pages)
        program = self._page_programs.get((kind, instance, n))
        if program is None:
            inst = self.instances
            s = inst.sharding((instance,), inst.pool_spec)
            pool = KVCache(*(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x in inst.pools[instance]))
            slots = jax.ShapeDtypeStruct((n, self.page_size), np.int32, sharding=inst.sharding((instance,), P()))
            if kind == "gather":
                fn = jax.jit(gather_pages_program, out_shardings=KVCache(s, s))
                program = fn.lower(pool, slots).compile()
            else:
                page = (n, *pool.k.shape[1:3], self.page_size, pool.k.shape[-1])
                new = KVCache(*(jax.ShapeDtypeStruct(page, pool.k.dtype, sharding=s) for _ in range(2)))
                outs = (KVCache(s, s), inst.sharding((instance,), P()))
                fn = jax.jit(scatter_pages_program, donate_argnums=0, out_shardings=outs)
                program = fn.lower(pool, slots, new).compile()
            self._page_programs[(kind, instance, n)] = program
        return program

    def warmup_pages(self) -> int:
        """Compile the host tier's page programs of this process's instances (every bucket up to
        MAX_PAGE_BATCH pages): saves and loads then never wait for a compile. Returns how many."""
        if self.host_store is None:
            return 0
        jobs = [
            (kind, i, 1 << b)
            for i, local in enumerate(self.instances.local)
            if local
            for b in range(MAX_PAGE_BATCH.bit_length())
            for kind in ("gather", "scatter")
        ]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            list(pool.map(lambda job: self._page_program(*job), jobs))
        return len(jobs)

    def repair(self, group: Group) -> list[int]:
        """Instances of the group whose pools a failed program left deleted (donated) or in error get new
        empty pools; returns them (their KV is lost), on every process."""
        seq = None
        if self.peers is not None and not self.instances.is_local(group):
            seq = self.peers.send({"op": "repair", "group": list(group)})
        lost = self.repair_local(group)
        if seq is not None:
            lost += [i for answer in self.peers.answers(seq, group) for i in answer["lost"]]
        return sorted(lost)

    def repair_local(self, group: Group) -> list[int]:
        """repair() of this process's instances of the group."""
        lost = []
        for i in [i for i in group if self.instances.local[i]]:
            try:
                pool = self.instances.pools[i]
                intact = not any(x.is_deleted() for x in pool) and jax.block_until_ready(pool) is not None
            except Exception:  # a pool computed by the failed program raises its error
                intact = False
            if not intact:
                self.instances.reset_pool(i)
                lost.append(i)
        return lost

    def warmup(self, jobs: Sequence[tuple[str, Group, int, int, SamplerFlags]], show: bool) -> int:
        """Compile programs: (kind, group, tokens or rows per rank, sampled rows, sampler variant) each; no
        more than the program cache keeps (the first ones: the rest would only evict them). In a multi-host
        run every process does the same, in the same order, and runs each group that spans processes once."""
        seq = None
        if self.peers is not None:
            seq = self.peers.send({"op": "warmup", "jobs": [list(job) for job in jobs]})
        compiled = self.warmup_local(jobs, show)
        if seq is not None:
            self.peers.answers(seq, range(self.instances.n), timeout_s=float("inf"))  # heartbeats still count
        return compiled

    def warmup_local(self, jobs: Sequence[tuple[str, Group, int, int, SamplerFlags]], show: bool) -> int:
        """warmup() of this process's programs; then every group of the jobs that spans several processes
        runs once (its collectives' connections are made before serving), in the jobs' order."""
        keep = self.programs.max_programs
        if keep is not None and len(jobs) > keep:
            log.warning(
                "warming up %d of %d programs: the program cache keeps %d (this process's memory-map limit, "
                "vm.max_map_count, bounds it); the rest compile when first used",
                keep,
                len(jobs),
                keep,
            )
        before = self.programs.compiles
        local = [job for job in jobs[:keep] if self.instances.has_local(job[1])]
        # XLA compiles with the GIL released: programs compile side by side, one per core (up to 4: each
        # compilation holds its own working memory)
        workers = max(1, min(4, os.cpu_count() or 1, len(local)))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="loong-warmup") as pool:
            futures = [pool.submit(self.compiled, *job) for job in local]
            progress = tqdm(total=len(jobs[:keep]), desc="warming up programs", disable=not show, unit="program")
            with progress:
                progress.update(len(jobs[:keep]) - len(local))
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    progress.update(1)
        inst = self.instances
        for group in dict.fromkeys(tuple(job[1]) for job in jobs):
            if inst.has_local(group) and len({inst.owner[i] for i in group}) > 1:
                key, fn, args, donate = self._program_args("decode", group, 1, 1, SamplerFlags())
                program = self.programs.get(key, fn, args, donate_argnums=donate)
                jax.block_until_ready(self._dispatch(program, group, args))
        self.warmup_pages()
        return self.programs.compiles - before

    def compiled(self, kind: str, group: Group, size: int, rows: int, flags: SamplerFlags = VARIANTS[0]) -> Any:
        """The compiled program of a kind for a group, per-rank shape and sampler variant (compiles if new)."""
        key, fn, args, donate = self._program_args(kind, group, size, rows, flags)
        return self.programs.get(key, fn, args, donate_argnums=donate)

    def _program_args(
        self,
        kind: str,
        group: Group,
        size: int,
        rows: int,
        flags: SamplerFlags,
        abstract_slots: int | None = None,
    ) -> tuple[Any, Any, tuple, tuple[int, ...]]:
        """Cache key, function, arguments and donated arguments of a program with placeholder inputs: size is
        tokens per rank (prefill, or "append": a prefill attending to K/V its requests hold), rows per rank
        (decode) or tokens (migrate); rows are the sampled rows (prefill) or the steps of a burst (decode).
        With abstract_slots: shapes only (no device memory) and pools of that many slots."""
        d, inst = len(group), self.instances
        abstract = abstract_slots is not None
        num_slots = abstract_slots if abstract else self.num_slots
        pools = inst.abstract_pools(group, num_slots) if abstract else inst.group_pools(group)
        rows_sharding = inst.sharding(group, P(SP))
        if kind == "migrate":
            inp = MigrateInputs(*(np.full((2, size), num_slots, np.int32) for _ in range(2)))
            fn = functools.partial(migrate_program, inst.mesh(group), inst.pool_spec)
            return ("migrate", group, shape_key(inp)), fn, (pools, _place(inp, rows_sharding, abstract)), (0,)
        prefill = kind in ("prefill", "append")
        samp = sampler_inputs([[]] * d, rows if prefill else size, flags, self.penalty_len, self.cfg.vocab_size)
        z = np.zeros((d, size), np.int32)
        if prefill:
            keep = np.full((d, d, size), num_slots, np.int32)
            width = self.prefix_width(num_slots) if kind == "append" else 0  # room for any hit, or none held
            held = np.full((d, width), num_slots, np.int32)
            inp = PrefillInputs(z, z, z - 1, z + 1, keep, np.zeros((d, rows), np.int32), held, held * 0 - 1, z[:, 0])
            kind = "prefill"  # an appending prefill is the prefill program on inputs with held slots
        else:
            table = np.zeros((d, d * size, self.page_table_width), np.int32)
            slots = np.full((d, rows, size), num_slots, np.int32)
            inp = DecodeInputs(z, z, slots, table, np.zeros((d, d * size), np.int32), z > 0)
        spec = layout((inp, samp))
        fn = packed_program(self._program_fn(kind, group, flags), spec, kind)
        params = inst.abstract_params(group) if abstract else inst.group_params(group)
        words = _place(pack((inp, samp)), rows_sharding, abstract)
        args = (params, pools, words, words) if kind == "decode" else (params, pools, words)
        return (kind, group, flags, spec), fn, args, (1,)


_COMPILE_COSTS: dict[str, tuple[int, int]] = {}  # lowered program text -> its costs (same text, same costs)


def _compile_costs(lowered: Any, options: dict[str, Any]) -> tuple[int, int]:
    """Per-device temporary bytes of a lowered program and the memory mappings its compiled code took,
    compiled once per distinct program text and compiler options."""
    key = hashlib.sha256((lowered.as_text() + repr(sorted(options.items()))).encode()).hexdigest()
    if key not in _COMPILE_COSTS:
        before = count_memory_maps()
        compiled = lowered.compile(compiler_options=options or None)
        _COMPILE_COSTS[key] = (int(compiled.memory_analysis().temp_size_in_bytes), count_memory_maps() - before)
    return _COMPILE_COSTS[key]


def _place(tree: Any, sharding: Any, abstract: bool) -> Any:
    """Host arrays onto the devices of a sharding, or only their shapes with it."""
    if abstract:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.device_put(tree, sharding)
