"""How much memory the instances' devices have, and the KV pool size that fits in it.

The KV pools take what is left of a fraction (`memory_utilization`) of the memory after what is already in
use, the weight copies and the compiled programs' temporaries. Memory comes in *domains*: an accelerator's
own memory serves its one device; the host's memory serves every virtual CPU device at once (they share
it). `size_kv_pools` is a pure function of those figures, so it is tested with made-up ones; the probes
read the real figures (`/proc`, the cgroup limit, `Device.memory_stats()`).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
from collections.abc import Sequence
from typing import Any

GiB = 1 << 30
DEFAULT_UTILIZATION = {"host": 0.5, "device": 0.9}  # CPU: leave the host usable; accelerators: like vLLM
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number
PROGRAM_HOST_BYTES = 8 << 20  # host memory per compiled program (measured 6.2-6.5 MB for SmolLM2 on XLA CPU)
# Share of the process's remaining memory mappings (Linux vm.max_map_count) the compiled programs may take: an
# XLA CPU program of SmolLM2 maps about 300 regions of JIT code, and a process out of mappings dies inside
# LLVM ("Unable to allocate section memory"), so the program cache is bounded by this too.
MAP_SHARE = 0.75
MIN_PROGRAMS = 8  # fewer programs than this cannot serve (a prefill and a decode per group, both variants)


@dataclasses.dataclass(frozen=True)
class MemoryDomain:
    """Memory some devices draw on: `capacity` bytes this process may hold at most, `in_use` held now."""

    name: str  # "host" or the accelerator's name
    capacity: int
    in_use: int
    devices: tuple[int, ...]  # positions in the engine's device list (instance i, tp rank r: i * tp + r)
    shared: bool  # True for the host (virtual CPU devices), False for an accelerator's own memory


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per device: bytes of one weight copy, of the largest program's temporaries, and of one KV token; and
    the host memory of the compiled programs (counted where the devices' memory is the host's)."""

    weight_bytes: int
    temp_bytes: int
    kv_bytes_per_token: int
    program_bytes: int = 0
    maps_per_program: int = 0  # memory mappings one compiled program takes (the largest measured)


@dataclasses.dataclass(frozen=True)
class KVCapacity:
    """The KV pool size chosen (or checked), with the figures it was derived from, for logs and the API."""

    tokens_per_instance: int
    num_instances: int
    bytes_per_token: int  # one instance's K and V of one token, all layers (all its devices together)
    how: str  # "sized from memory" or "given (kv_tokens_per_instance)"
    utilization: float
    domain: str  # the domain that limited the size
    budget_bytes: int  # utilization x capacity of that domain
    in_use_bytes: int
    weight_bytes: int  # weights and temporaries of the devices in that domain
    temp_bytes: int
    program_bytes: int = 0  # compiled programs, where that domain is the host's memory

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_instance * self.num_instances

    @property
    def bytes_per_instance(self) -> int:
        return self.tokens_per_instance * self.bytes_per_token

    def describe(self) -> str:
        """One log line: the capacity and how it was derived."""
        return (
            f"KV cache: {self.tokens_per_instance:,} tokens per instance x {self.num_instances} = "
            f"{self.total_tokens:,} tokens ({_gib(self.bytes_per_instance * self.num_instances)} GiB), {self.how}: "
            f"memory_utilization {self.utilization:g} x {self.domain} memory = {_gib(self.budget_bytes)} GiB, "
            f"minus {_gib(self.in_use_bytes)} GiB in use, {_gib(self.weight_bytes)} GiB of weights, "
            f"{_gib(self.temp_bytes)} GiB of program temporaries, {_gib(self.program_bytes)} GiB of compiled programs"
        )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_tokens=self.total_tokens, bytes_per_instance=self.bytes_per_instance)
        return d


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def default_utilization(domains: Sequence[MemoryDomain]) -> float:
    return DEFAULT_UTILIZATION["host" if any(d.shared for d in domains) else "device"]


def size_kv_pools(
    domains: Sequence[MemoryDomain],
    footprint: Footprint,
    *,
    num_instances: int,
    tp: int,
    page_size: int,
    utilization: float | None = None,
    requested_tokens: int | None = None,
    useful_tokens: int | None = None,
) -> KVCapacity:
    """Tokens per instance (whole pages) that fit every domain: `requested_tokens` if given and it fits (else
    ValueError naming the numbers), otherwise as many as fit, but no more than `useful_tokens` (what one
    instance could ever hold). Raises ValueError if not even one page fits."""
    utilization = default_utilization(domains) if utilization is None else utilization
    if not 0 < utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {utilization}")
    if requested_tokens is not None and requested_tokens < page_size:
        raise ValueError(f"kv_tokens_per_instance must be >= page_size ({page_size}), got {requested_tokens}")
    best: tuple[int, KVCapacity] | None = None
    for dom in domains:
        # Instances are whole rows of tp devices: the pool of an instance with any device here counts in full.
        instances = sorted({dev // tp for dev in dom.devices})
        budget = int(utilization * dom.capacity)
        programs = footprint.program_bytes if dom.shared else 0
        fixed = len(dom.devices) * (footprint.weight_bytes + footprint.temp_bytes) + programs
        per_token = len(dom.devices) * footprint.kv_bytes_per_token  # every device's share of a token's K/V
        room = budget - dom.in_use - fixed
        pages = max(0, room) // (per_token * page_size) if per_token else 1 << 40
        cap = KVCapacity(
            tokens_per_instance=int(pages * page_size),
            num_instances=num_instances,
            bytes_per_token=footprint.kv_bytes_per_token * tp,
            how="sized from memory",
            utilization=utilization,
            domain=dom.name,
            budget_bytes=budget,
            in_use_bytes=dom.in_use,
            weight_bytes=len(dom.devices) * footprint.weight_bytes,
            temp_bytes=len(dom.devices) * footprint.temp_bytes,
            program_bytes=programs,
        )
        if best is None or cap.tokens_per_instance < best[0]:
            best = (cap.tokens_per_instance, cap)
        if requested_tokens is not None:
            need = requested_tokens * per_token
            if dom.in_use + fixed + need > budget:
                raise ValueError(
                    f"kv_tokens_per_instance={requested_tokens:,} does not fit: on the {dom.name} memory, "
                    f"{len(instances)} instance(s) need {_gib(need)} GiB of KV cache + {_gib(fixed)} GiB of "
                    f"weights and programs, with {_gib(dom.in_use)} GiB already in use, but "
                    f"memory_utilization {utilization:g} of {_gib(dom.capacity)} GiB allows {_gib(budget)} GiB. "
                    f"Use kv_tokens_per_instance <= {cap.tokens_per_instance:,} (or leave it unset to size it "
                    "from memory), fewer instances, or a larger memory_utilization."
                )
    assert best is not None, "no memory domain"
    cap = best[1]
    if requested_tokens is not None:
        return dataclasses.replace(cap, tokens_per_instance=requested_tokens, how="given (kv_tokens_per_instance)")
    if useful_tokens is not None and cap.tokens_per_instance > useful_tokens:
        tokens = -(-useful_tokens // page_size) * page_size
        how = "sized from memory, capped at what one instance can use"
        return dataclasses.replace(cap, tokens_per_instance=tokens, how=how)
    if cap.tokens_per_instance < page_size:
        d = next(x for x in domains if x.name == cap.domain)
        raise ValueError(
            f"no memory left for the KV cache on the {d.name} memory: memory_utilization {utilization:g} of "
            f"{_gib(d.capacity)} GiB allows {_gib(cap.budget_bytes)} GiB, but {_gib(d.in_use)} GiB are in use "
            f"and the weights and programs need {_gib(cap.weight_bytes + cap.temp_bytes + cap.program_bytes)} GiB. "
            "Use fewer instances, a smaller max_prefill_tokens / max_num_seqs, or a larger memory_utilization."
        )
    return cap


HOST_TIER_SHARE = 0.25  # default host tier: this share of the host memory left once the pools have theirs


def size_host_tier(requested_gib: float | None, page_bytes: int, available: int, host_pools: int = 0) -> int:
    """Pages of the prefix cache's host tier: requested_gib GiB (0: none), or by default HOST_TIER_SHARE of
    the host memory `available` after the pools that live in it (`host_pools` bytes; on CPU the pools are
    host memory). ValueError naming the numbers if the size asked for does not fit there."""
    room = max(0, available - host_pools)
    if requested_gib is None:
        return int(HOST_TIER_SHARE * room) // page_bytes
    if requested_gib < 0:
        raise ValueError(f"host_kv_cache_gib must be >= 0 (0 turns the host tier off), got {requested_gib:g}")
    want = int(requested_gib * GiB)
    if want > room:
        raise ValueError(
            f"host_kv_cache_gib={requested_gib:g} does not fit: the host has {_gib(available)} GiB available"
            + (f", of which the KV pools take {_gib(host_pools)} GiB" if host_pools else "")
            + f". Use host_kv_cache_gib <= {room / GiB:.2f} (or leave it unset for {HOST_TIER_SHARE:g} of that)."
        )
    return want // page_bytes


# ----- probes -----------------------------------------------------------------------------------------


def probe_domains(devices: Sequence[Any]) -> list[MemoryDomain]:
    """The memory domains of the engine's devices (in instance order): one per accelerator, one for the host."""
    domains: list[MemoryDomain] = []
    host: list[int] = []
    for i, dev in enumerate(devices):
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if not stats or "bytes_limit" not in stats:
            host.append(i)
            continue
        name = f"{dev.platform}:{dev.id} ({getattr(dev, 'device_kind', dev.platform)})"
        domains.append(MemoryDomain(name, int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)), (i,), False))
    if host:
        available, rss = host_available_bytes(), process_rss_bytes()
        domains.append(MemoryDomain("host", available + rss, rss, tuple(host), True))
    return domains


def memory_map_room() -> int | None:
    """How many more memory mappings this process may create (vm.max_map_count minus those it has), or None
    where the system does not say (not Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return max(0, limit - count_memory_maps())


def count_memory_maps() -> int:
    """Memory mappings this process has now (0 where the system does not say)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def program_limit(maps_per_program: int, room: int | None, wanted: int) -> int:
    """How many compiled programs to keep at most: `wanted`, unless MAP_SHARE of the mappings left cannot
    hold that many. Fewer than MIN_PROGRAMS is a ValueError naming the limit and how to raise it."""
    if room is None or maps_per_program <= 0:
        return wanted
    fits = int(MAP_SHARE * room) // maps_per_program
    if fits < MIN_PROGRAMS:
        raise ValueError(
            f"this process may create only {room} more memory mappings (vm.max_map_count) and a compiled "
            f"program takes about {maps_per_program}: room for {fits} programs, at least {MIN_PROGRAMS} are "
            "needed; raise it (sysctl -w vm.max_map_count=262144) or use fewer instances"
        )
    return min(wanted, fits)


def process_rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best figure there is
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def host_available_bytes() -> int:
    """Memory the host can still give this process: the kernel's MemAvailable, within the cgroup's limit."""
    available = _meminfo_available()
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (reclaimable file cache counted as free), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":  # cgroup v2
            base = [f"/sys/fs/cgroup{path}", "/sys/fs/cgroup"]
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            base = [f"/sys/fs/cgroup/memory{path}", "/sys/fs/cgroup/memory"]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for d in base:
            limit, usage = _read_int(f"{d}/{files[0]}"), _read_int(f"{d}/{files[1]}")
            if limit is None or usage is None:
                continue
            if limit >= _NO_LIMIT:
                return None
            return max(0, limit - usage + _stat_field(f"{d}/memory.stat", files[2]))
    return None


def _stat_field(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except OSError:
        pass
    return 0
