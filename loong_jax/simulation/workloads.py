"""Request streams for the simulator and benchmarks: the paper's length ranges, Zipf lengths, the Mooncake trace.

Length ranges follow DESIGN.md section 5 (inputs log-uniform within each dataset's range, outputs of the
dataset's typical size, EOS ignored); arrivals are Poisson at a given rate, or a trace's own timestamps
compressed by a factor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

BLOCK_TOKENS = 512  # tokens per hash id of the Mooncake trace


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    arrival: float  # seconds from the start
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # per 512-token block of the input: equal ids, equal blocks (and prefixes)


def prompt_ids(req: WorkloadRequest, vocab_size: int) -> list[int]:
    """Token ids standing for a request's input: each hash id's block drawn from a generator seeded by the
    id (equal ids give equal blocks, so cached prefixes are found as in the trace); without hash ids, a
    block of zeros (any two such prompts of one length are equal)."""
    if not req.hash_ids:
        return [0] * req.input_len
    blocks = [np.random.default_rng(h).integers(3, vocab_size, BLOCK_TOKENS) for h in req.hash_ids]
    return np.concatenate(blocks)[: req.input_len].tolist()


# dataset -> (input range, output range), tokens; all log-uniform
PAPER_RANGES = {
    "sharegpt": ((4, 2_300), (4, 1_000)),
    "leval": ((2_700, 210_500), (16, 512)),
    "lveval": ((15_100, 497_300), (16, 256)),
}
WORKLOADS = ("sharegpt", "leval", "lveval", "mixed", "zipf1.0", "zipf1.2", "zipf1.4", "mooncake")


def _log_uniform(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)


def zipf_lengths(rng: np.random.Generator, alpha: float, n: int, lo: int = 10, hi: int = 200_000) -> np.ndarray:
    """Lengths with p(l) ~ 1 / l^alpha on [lo, hi), by inverting the continuous power law's CDF."""
    u = rng.uniform(size=n)
    if alpha == 1.0:
        x = lo * (hi / lo) ** u
    else:
        a = 1.0 - alpha
        x = (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)
    return np.clip(x.astype(np.int64), lo, hi - 1)


def poisson_arrivals(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def lengths(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, output lengths) of n requests of a synthetic workload."""
    if name in PAPER_RANGES:
        (ilo, ihi), (olo, ohi) = PAPER_RANGES[name]
        return _log_uniform(rng, ilo, ihi, n), _log_uniform(rng, olo, ohi, n)
    if name == "mixed":
        parts = [lengths(k, n // 3 + (i < n % 3), rng) for i, k in enumerate(PAPER_RANGES)]
        order = rng.permutation(n)
        return np.concatenate([p[0] for p in parts])[order], np.concatenate([p[1] for p in parts])[order]
    if name.startswith("zipf"):
        return zipf_lengths(rng, float(name[4:]), n), _log_uniform(rng, 16, 512, n)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def synthetic(name: str, rate: float, n: int, seed: int = 0) -> list[WorkloadRequest]:
    """n requests of a named workload arriving as a Poisson process of `rate` requests per second."""
    rng = np.random.default_rng(seed)
    ins, outs = lengths(name, n, rng)
    arrivals = poisson_arrivals(rng, rate, n)
    return [WorkloadRequest(float(t), int(i), int(o)) for t, i, o in zip(arrivals, ins, outs)]


def mooncake(path: str | Path, n: int | None = None, speedup: float = 1.0, max_len: int | None = None) -> list:
    """The Mooncake trace: its timestamps (ms) divided by `speedup`, lengths clipped to max_len."""
    out = []
    with open(path) as f:
        for line in f:
            if n is not None and len(out) >= n:
                break
            row = json.loads(line)
            i, o = int(row["input_length"]), max(1, int(row["output_length"]))
            if max_len is not None:
                i = min(i, max_len - o)
            ids = tuple(row.get("hash_ids", ()))[: -(-i // BLOCK_TOKENS)]
            out.append(WorkloadRequest(row["timestamp"] / 1000.0 / speedup, i, o, ids))
    t0 = out[0].arrival if out else 0.0
    return [dataclasses.replace(r, arrival=r.arrival - t0) for r in out]


def trace_rate(reqs: list[WorkloadRequest]) -> float:
    """Mean arrival rate of a request stream (requests per second)."""
    span = reqs[-1].arrival - reqs[0].arrival if len(reqs) > 1 else 1.0
    return (len(reqs) - 1) / span if span > 0 else float("inf")
