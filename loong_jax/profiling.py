"""Fit the scheduler's cost model on the real executor: time prefills, decode steps and migrations.

Every shape is run once to compile, then timed; a share of the points is held out of the fit and the
fit's relative error on them is reported. The result is saved as JSON under a key naming the model and
the hardware (platform, device kind, instances, tp, dtype), and loaded at start-up by `LLM`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from loong_jax.engine import Engine
from loong_jax.model.sampling import SamplingParams
from loong_jax.runtime.placement import busiest_first_plan
from loong_jax.runtime.programs import PREFIX_BLOCK
from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork
from loong_jax.scheduling.cost_model import (
    CostModel,
    decode_features,
    fit_linear,
    fit_prefill,
    prefill_features,
    relative_errors,
)

log = logging.getLogger("loong_jax")
DEFAULT_PROFILE_DIR = os.environ.get("LOONG_PROFILE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "loong_jax", "profiles"
)


def profile_key(engine: Engine) -> str:
    ex = engine.executor
    dev = ex.instances.devices[0][0]
    dtype = np.dtype(ex.dtype).name
    kind = dev.device_kind.replace(" ", "_")
    return f"{engine.cfg.name}-{dev.platform}-{kind}-n{engine.ecfg.num_instances}-tp{engine.ecfg.tp}-{dtype}"


def profile_path(key: str, directory: str | Path = DEFAULT_PROFILE_DIR) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return Path(directory) / f"{safe}.json"


@dataclasses.dataclass
class ProfileReport:
    cost: CostModel
    prefill_error: float  # median relative error on held-out prefills
    appending_error: float  # the same, of the held-out passes appending to K/V held (cached prefix, chunks)
    decode_error: float
    points: dict
    seconds: float


def _timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # compile and warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _prefill_once(engine: Engine, group: tuple[int, ...], lengths: Sequence[int], rng) -> None:
    reqs = [engine.add_request(rng.integers(3, engine.cfg.vocab_size, n).tolist(), _params(4)) for n in lengths]
    pools = [engine.pools[i] for i in group]
    engine.execute(Iteration(prefills=[PrefillWork(group, reqs, busiest_first_plan(lengths, pools))]))
    for r in reqs:
        engine.abort(r.rid)


def _appending_pass(engine: Engine, group: tuple[int, ...], new: int, held: int, repeats: int, rng) -> float:
    """Median time of a prefill pass of `new` tokens appending to the K/V of the prompt's first `held` tokens,
    which the group holds spread over its instances (a cached prefix or the chunks before)."""
    times = []
    for k in range(repeats + 1):  # the first run compiles
        req = engine.add_request(rng.integers(3, engine.cfg.vocab_size, held + new).tolist(), _params(4))
        plan = np.arange(held + new, dtype=np.int32) % len(group)
        engine.execute(Iteration(prefills=[PrefillWork(group, [req], [plan], chunk=[held])]))
        t0 = time.perf_counter()
        engine.execute(Iteration(prefills=[PrefillWork(group, [req], [plan], chunk=[new])]))
        if k:
            times.append(time.perf_counter() - t0)
        engine.abort(req.rid)
    return float(np.median(times))


def _decode_steps(engine: Engine, group: tuple[int, ...], batch: int, context: int, repeats: int, rng) -> float:
    """Median time of a decode step of `batch` requests with `context` tokens each, KV spread on the group."""
    d = len(group)
    reqs = [
        engine.add_request(rng.integers(3, engine.cfg.vocab_size, context).tolist(), _params(64)) for _ in range(batch)
    ]
    plans = [np.arange(context, dtype=np.int32) % d for _ in reqs]  # every request's KV on every rank
    for r in reqs:
        engine.execute(Iteration(prefills=[PrefillWork(group, [r], [plans[0]])]))
    masters = [k % d for k in range(batch)]

    def step():
        engine.execute(Iteration(decodes=[DecodeWork(group, reqs, masters)]))

    t = _timed(step, repeats)
    for r in reqs:
        engine.abort(r.rid)
    return t


def profile(engine: Engine, repeats: int = 2, seed: int = 0, show: bool = True) -> ProfileReport:
    """Measure on `engine`'s executor and fit a cost model (takes a few minutes on CPU)."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    ecfg = engine.ecfg
    bucket = ecfg.min_prefill_bucket
    degrees = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= ecfg.num_instances]
    say = print if show else log.info
    prefill, decode, points = {}, {}, {"prefill": {}, "appending": {}, "decode": {}, "migrate": []}
    p_err, a_err, d_err = [], [], []
    for d in degrees:
        group = tuple(range(d))
        cap = -(-ecfg.max_prefill_tokens // d)
        sizes = sorted({max(8, int(cap * d * f)) for f in (0.03, 0.08, 0.15, 0.3, 0.5, 0.75, 0.95)})
        batches = [[n] for n in sizes] + [[sizes[1]] * 2, [sizes[2], sizes[0]], [sizes[3]] * 2]
        batches = [b for b in batches if -(-sum(b) // d) + len(b) <= cap and sum(b) < ecfg.max_model_len]
        times = [_timed(lambda b=b, g=group: _prefill_once(engine, g, b, rng), repeats) for b in batches]
        # passes of n new tokens after h held ones (a cached prefix, earlier chunks), K/V spread on the group
        room = min(ecfg.max_model_len, ecfg.kv_tokens_per_instance * d // 2)
        appending = [(n, h) for n in (sizes[1], sizes[3]) for h in (sizes[2], sizes[4]) if n + h < room]
        a_times = [_appending_pass(engine, group, n, h, repeats, rng) for n, h in appending]
        lengths = batches + [[n] for n, _ in appending]
        cached = [()] * len(batches) + [[h] for _, h in appending]
        measured = times + a_times
        fit_idx = [k for k in range(len(lengths)) if k % 3 != 1]
        held = [k for k in range(len(lengths)) if k % 3 == 1]
        feats = prefill_features(
            [lengths[k] for k in fit_idx], d, ecfg.min_prefill_bucket, [cached[k] for k in fit_idx], PREFIX_BLOCK
        )
        prefill[d] = fit_prefill(feats, np.array([measured[k] for k in fit_idx]))
        probe = CostModel("probe", {d: prefill[d]}, {1: (0, 0, 0)}, prefill_bucket=bucket, held_block=PREFIX_BLOCK)
        for k in held:
            err = relative_errors([probe.prefill_time(d, lengths[k], cached[k])], [measured[k]])[0]
            (a_err if cached[k] else p_err).append(float(err))
        points["prefill"][d] = [{"lengths": b, "seconds": t} for b, t in zip(batches, times)]
        points["appending"][d] = [{"new": n, "held": h, "seconds": t} for (n, h), t in zip(appending, a_times)]
        say(f"prefill degree {d}: " + ", ".join(f"{sum(b)} tok {t * 1000:.0f} ms" for b, t in zip(batches, times)))
        say(
            f"appending degree {d}: "
            + ", ".join(f"{n} after {h} {t * 1000:.0f} ms" for (n, h), t in zip(appending, a_times))
        )
        grid = []
        for b in [x for x in (1, 2, 4, 8, 16) if x <= ecfg.max_num_seqs]:
            for c in (32, 128, 512):
                if b * (c + 64) <= ecfg.kv_tokens_per_instance * d // 2 and c + 64 < ecfg.max_model_len:
                    grid.append((b, c))
        dtimes = [_decode_steps(engine, group, b, c, repeats + 1, rng) for b, c in grid]
        feats = [(b, b * c) for b, c in grid]
        fit_idx = [k for k in range(len(grid)) if k % 3 != 1]
        held = [k for k in range(len(grid)) if k % 3 == 1]
        decode[d] = fit_linear(decode_features([feats[k] for k in fit_idx]), np.array([dtimes[k] for k in fit_idx]))
        probe = CostModel("probe", {1: (0, 0, 0)}, {d: decode[d]})
        d_err += relative_errors([probe.decode_time(d, *feats[k]) for k in held], [dtimes[k] for k in held]).tolist()
        points["decode"][d] = [{"batch": b, "context": c, "seconds": t} for (b, c), t in zip(grid, dtimes)]
        say(f"decode degree {d}: " + ", ".join(f"b{b} c{c} {t * 1000:.0f} ms" for (b, c), t in zip(grid, dtimes)))
    latency, rate = 0.0, float("inf")
    if ecfg.num_instances > 1:
        sizes = [n for n in (64, 256, 1024) if n + 16 < min(ecfg.kv_tokens_per_instance, ecfg.max_model_len)]
        mtimes = []
        for n in sizes:
            req = engine.add_request(rng.integers(3, engine.cfg.vocab_size, n).tolist(), _params(4))
            engine.execute(Iteration(prefills=[PrefillWork((0,), [req], [np.zeros(n, np.int32)])]))
            mtimes.append(_timed(lambda r=req, n=n: _there_and_back(engine, r.rid, n), repeats) / 2)
            engine.abort(req.rid)
        slope, latency = np.polyfit(np.array(sizes, float), np.array(mtimes), 1)
        rate = 1.0 / max(slope, 1e-12)
        latency = max(0.0, float(latency))
        points["migrate"] = [{"tokens": n, "seconds": t} for n, t in zip(sizes, mtimes)]
        say("migration: " + ", ".join(f"{n} tok {t * 1000:.1f} ms" for n, t in zip(sizes, mtimes)))
    reload_latency, reload_rate = 0.0, float("inf")
    tier = engine.prefix_cache.tier
    if tier is not None:
        pages = [n for n in (4, 16, 64) if n < engine.pools[0].free_pages and n <= tier.capacity]
        rtimes = [_timed(lambda n=n: _reload_pages(engine, n), repeats) for n in pages]
        tokens = [n * ecfg.page_size for n in pages]
        if len(tokens) >= 2:
            slope, reload_latency = np.polyfit(np.array(tokens, float), np.array(rtimes), 1)
            reload_rate, reload_latency = 1.0 / max(slope, 1e-12), max(0.0, float(reload_latency))
        points["reload"] = [{"tokens": n, "seconds": t} for n, t in zip(tokens, rtimes)]
        say("reload from host memory: " + ", ".join(f"{n} tok {t * 1000:.1f} ms" for n, t in zip(tokens, rtimes)))
    cost = CostModel(
        profile_key(engine), prefill, decode, latency, rate, bucket, PREFIX_BLOCK, reload_latency, reload_rate
    )
    report = ProfileReport(
        cost,
        float(np.median(p_err)),
        float(np.median(a_err)) if a_err else float("nan"),
        float(np.median(d_err)),
        points,
        time.perf_counter() - t_start,
    )
    say(
        f"held-out median relative error: prefill {report.prefill_error:.1%}, appending prefill "
        f"{report.appending_error:.1%}, decode {report.decode_error:.1%} ({len(p_err)}, {len(a_err)} and "
        f"{len(d_err)} points); {report.seconds:.0f} s"
    )
    return report


def _reload_pages(engine: Engine, n: int) -> None:
    """Load n pages of K/V from host tier slots into instance 0's pool (into pages held for the time of it)."""
    pool, rid = engine.pools[0], -1
    slots = pool.append(rid, n * pool.page_size)
    try:
        pages = (slots[:: pool.page_size] // pool.page_size).tolist()
        jax.block_until_ready(engine.executor.load_pages({0: (pages, list(range(n)))}))
    finally:
        pool.release(rid)


def _there_and_back(engine: Engine, rid: int, n: int) -> None:
    engine.migrate(rid, 0, 1, n)
    engine.migrate(rid, 1, 0, n)
