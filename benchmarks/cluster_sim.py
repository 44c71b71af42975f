"""Elastic sequence parallelism against the systems users would pick instead, on a simulated GPU cluster.

Every system is a policy over the same engine loop, simulated executor and analytical cluster model
(default: 8 x A800 serving the 7B LWM-Text-1M / Llama-2 architecture). For each workload the request
rate is swept; the script reports the paper's metrics (normalised per-token, input and output latency,
throughput at the SLO, P90 goodput for the Zipf workloads) and writes JSON, latency-versus-rate plots and
a timeline of which instances ran which group.

    .venv/bin/python benchmarks/cluster_sim.py                    # all workloads, all systems
    .venv/bin/python benchmarks/cluster_sim.py --workloads zipf1.0 --requests 300
    .venv/bin/python benchmarks/cluster_sim.py --workloads mooncake --requests 1000 \
        --systems esp esp+cache esp+host esp+unbounded vllm_tp8+host replicas_4xtp2+host   # the host tier
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import time
from collections import OrderedDict
from pathlib import Path

from timeline import draw

from loong_jax.scheduling.elastic import SLO, ElasticScheduler, SchedulerConfig
from loong_jax.scheduling.policy import IdleFirstPolicy
from loong_jax.simulation.baselines import ChunkedPrefillPolicy, DisaggregatedPolicy, ReplicaPolicy, StaticGroupPolicy
from loong_jax.simulation.cluster_model import GPUS, LLAMA2_7B, ClusterModel
from loong_jax.simulation.simulate import SimCluster, SimResult, simulate
from loong_jax.simulation.workloads import BLOCK_TOKENS, WORKLOADS, mooncake, synthetic, trace_rate

MAX_LEN = 1 << 20  # LWM-Text-1M
PLACEMENT = "busiest"
REPLICA_BALANCE = "round_robin"  # independent replicas behind a round-robin load balancer
TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_conversation_trace.jsonl"

# Paper SLOs in ms per token: [per-token, input, output]; chunk sizes of the chunked-prefill baseline.
SLO_MS = {
    "sharegpt": (92, 20, 320),
    "leval": (3.5, 1.8, 320),
    "lveval": (2.5, 2.5, 365),
    "mixed": (70, 90, 360),
}
CHUNK = {"sharegpt": 256, "leval": 2048, "lveval": 16384, "mixed": 2048}
# Rate grids centred on the paper's elastic-SP throughput (requests/s); the Mooncake grid is a speed-up.
CENTRE = {
    "sharegpt": 29.47,
    "leval": 2.416,
    "lveval": 0.201,
    "mixed": 0.553,
    "zipf1.0": 1.122,
    "zipf1.2": 2.925,
    "zipf1.4": 8.757,
    "mooncake": 1.0,
}
MIN_ARRIVAL_SECONDS = 30  # a run spans at least this much arrival time (steady state), up to MAX_REQUESTS
MAX_REQUESTS = 3000
FACTORS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
PAPER = {  # DESIGN.md section 5
    "sharegpt": {"esp": 29.47, "vllm_tp8": 6.35, "disagg_4p4d": 10.37, "chunked_tp8": 23.13},
    "leval": {"esp": 2.416, "vllm_tp8": 1.144, "disagg_4p4d": 0.415, "chunked_tp8": 1.231},
    "lveval": {"esp": 0.201, "vllm_tp8": 0.090, "chunked_tp8": 0.082},
    "mixed": {"esp": 0.553, "vllm_tp8": 0.208, "chunked_tp8": 0.144},
    "zipf1.0": {"esp": 1.122, "vllm_tp8": 0.405, "static_sp_tp2x4": 0.481, "replicas_4xtp2": 0.360},
    "zipf1.2": {"esp": 2.925, "vllm_tp8": 1.355, "static_sp_tp2x4": 1.478, "replicas_4xtp2": 1.289},
    "zipf1.4": {"esp": 8.757, "vllm_tp8": 5.723, "static_sp_tp2x4": 5.447, "replicas_4xtp2": 5.000},
}
SYSTEMS = ("esp", "static_sp_tp2x4", "chunked_tp8", "disagg_4p4d", "vllm_tp8", "replicas_4xtp2")
# With prefix caching (workloads with hash ids only: the Mooncake trace): elastic SP's distributed cache,
# vLLM-style automatic prefix caching on one TP8 instance, replicas each with its own cache behind a router
# sending each request to the replica caching most of its prefix.
# "+host": the cache with a host-memory tier of --host-tier-gib per 8-GPU node (elastic SP and vLLM-style TP8:
# one tier; replicas: a quarter each, as four processes would); "+unbounded": a host tier without a limit;
# "+host-noprefetch": the host tier with loads only at a prefill's launch (none while a request waits).
CACHED = (
    "esp+cache",
    "vllm_tp8+cache",
    "replicas_4xtp2+cache",
    "esp+host",
    "esp+host-noprefetch",
    "vllm_tp8+host",
    "replicas_4xtp2+host",
    "esp+unbounded",
)
HOST_TIER_GIB = 768.0  # of an A800 node's 1 TiB of DRAM (DGX A100 class): 1.5M tokens of the 7B model's K/V
STATIC = ("static_sp_tp2x4", "vllm_tp8", "replicas_4xtp2")
GOODPUT_SLO = SLO(ttft_scale=25, ttft_floor=15.0, tpot=0.050)  # the Zipf ablation's SLO (P90 goodput)


def system(name: str, gpu: str, workload: str, host_gib: float = HOST_TIER_GIB) -> tuple[SimCluster, object]:
    """The simulated deployment and policy of a named system on 8 GPUs ("+cache": with prefix caching;
    "+host": and a host tier of host_gib per node; "+unbounded": and a host tier without a limit)."""
    if name.endswith("-noprefetch"):
        cluster, policy = system(name.removesuffix("-noprefetch"), gpu, workload, host_gib)
        return dataclasses.replace(cluster, host_prefetch=False), policy
    for suffix in ("+cache", "+host", "+unbounded"):
        if name.endswith(suffix):
            base = name.removesuffix(suffix)
            cluster, policy = system(base, gpu, workload)
            if base == "replicas_4xtp2":
                policy = ReplicaPolicy(4, "prefix")
            tokens = {"+cache": 0, "+host": host_gib * 2**30 / LLAMA2_7B.kv_bytes_per_token, "+unbounded": math.inf}
            tiers = cluster.num_instances if base == "replicas_4xtp2" else 1
            host = {"host_tier_tokens": tokens[suffix] / tiers, "host_tiers": tiers}
            return dataclasses.replace(cluster, prefix_caching=True, **host), policy
    g = GPUS[gpu]
    if name in ("esp", "static_sp_tp2x4", "replicas_4xtp2"):
        c = ClusterModel(g, LLAMA2_7B, 4, 2)
        limit = c.kv_tokens_per_instance if name == "replicas_4xtp2" else None
        cluster = SimCluster(c, 4, c.kv_tokens_per_instance, MAX_LEN, max_request_tokens=limit)
        if name == "esp":
            slo = None if workload in SLO_MS else GOODPUT_SLO  # targets where the workload is judged by them
            config = SchedulerConfig(
                aligned_groups=False,
                placement=PLACEMENT,
                defer_long=True,
                wait_for_steps=slo is not None,
                slo=slo,
                pause_later=slo is None,  # with targets, waiting for steps in flight covers this
            )
            return cluster, ElasticScheduler(4, c.fitted_cost_model(), config)
        return cluster, StaticGroupPolicy(4) if name == "static_sp_tp2x4" else ReplicaPolicy(4, REPLICA_BALANCE)
    if name in ("vllm_tp8", "chunked_tp8"):
        c = ClusterModel(g, LLAMA2_7B, 1, 8)
        cluster = SimCluster(c, 1, c.kv_tokens_per_instance, MAX_LEN)
        if name == "vllm_tp8":
            return cluster, IdleFirstPolicy(1, aligned_groups=False)
        return cluster, ChunkedPrefillPolicy(CHUNK.get(workload, 2048))
    if name == "disagg_4p4d":
        c = ClusterModel(g, LLAMA2_7B, 2, 4)
        return SimCluster(c, 2, c.kv_tokens_per_instance, MAX_LEN, max_request_tokens=c.kv_tokens_per_instance), (
            DisaggregatedPolicy()
        )
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")


def requests_for(workload: str, rate: float, n: int, seed: int) -> list:
    if workload == "mooncake":
        if not TRACE.exists():
            raise FileNotFoundError(f"the Mooncake trace is not at {TRACE}")
        return mooncake(TRACE, n=n, speedup=rate, max_len=MAX_LEN)
    return synthetic(workload, rate, n, seed)


def slo_misses(res: SimResult, gpu: str) -> dict[str, float]:
    """The share of requests meeting the Zipf ablation's SLO (TTFT <= max(25 x isolated prefill, 15 s) and
    TPOT <= 50 ms; isolated prefill: the request alone on 8 GPUs as one TP=8 instance), and the shares
    missing its TTFT and its TPOT target (a request may miss both; rejected ones miss both): which of
    prefill and decode limits the goodput."""
    ref = ClusterModel(GPUS[gpu], LLAMA2_7B, 1, 8)
    s = GOODPUT_SLO
    served = [r for r in res.records if r.rejected is None]
    ttft = [r.ttft <= max(s.ttft_scale * ref.prefill_time(1, [r.input_len]), s.ttft_floor) for r in served]
    tpot = [r.tpot <= s.tpot for r in served]
    n, lost = len(res.records), len(res.records) - len(served)
    return {
        "attained": sum(a and b for a, b in zip(ttft, tpot)) / n,
        "ttft_missed": (lost + ttft.count(False)) / n,
        "tpot_missed": (lost + tpot.count(False)) / n,
    }


def crossing(rates: list[float], values: list[float], limit: float) -> float:
    """Highest rate whose value stays within the limit, interpolated (log-linear) to the crossing point."""
    best = 0.0
    for k, (r, v) in enumerate(zip(rates, values)):
        if v <= limit:
            best = r
            continue
        if k > 0 and values[k - 1] <= limit:
            lo, hi = math.log(max(values[k - 1], 1e-9)), math.log(v)
            frac = (math.log(limit) - lo) / (hi - lo) if hi > lo else 0.0
            best = rates[k - 1] + frac * (r - rates[k - 1])
        break
    return best


def sweep(
    workload: str, name: str, n: int, gpu: str, seed: int, host_gib: float = HOST_TIER_GIB
) -> tuple[dict, list | None]:
    """One system's latencies and SLO attainment over the rate grid (raised while it still meets the SLO;
    stopped past saturation); returns its summary and, for elastic SP, the timeline of one run."""
    points, timeline = [], None
    factors = list(FACTORS)
    while factors:
        f = factors.pop(0)
        rate = CENTRE[workload] * f
        runs = n if workload == "mooncake" else max(n, min(MAX_REQUESTS, int(rate * MIN_ARRIVAL_SECONDS)))
        wl = requests_for(workload, rate, runs, seed)
        cluster, policy = system(name, gpu, workload, host_gib)
        t0 = time.perf_counter()
        res = simulate(cluster, policy, wl, record=(name == "esp" and f == 1.0))
        lat, misses = res.latencies(), slo_misses(res, gpu)
        point = {
            "rate": rate if workload != "mooncake" else trace_rate(wl),
            "latency_ms": {k: v * 1000 for k, v in lat.items()},
            "rejected": sum(r.rejected is not None for r in res.records),
            "slo_attainment": misses["attained"],
            "slo_misses": misses,
            "stats": res.stats,
            "sim_seconds": time.perf_counter() - t0,
        }
        points.append(point)
        if res.spans:
            timeline = res.spans
        if lat["per_token"] * 1000 > 20 * SLO_MS.get(workload, (200,))[0] and len(points) >= 3:
            break  # far past saturation; higher rates only get worse
        if workload not in SLO_MS and len(points) >= 3 and all(p["slo_attainment"] < 0.5 for p in points[-2:]):
            break  # goodput: well past the rate where 90% still meet the targets
        meets = point["slo_attainment"] >= 0.9
        if workload in SLO_MS:
            meets = lat["per_token"] * 1000 <= SLO_MS[workload][0]
        if not factors and meets and f < 64:
            factors.append(f * 2)  # still within the SLO: keep raising the rate
    rates = [p["rate"] for p in points]
    slo = SLO_MS.get(workload)
    summary: dict = {"points": points}
    if slo:
        for k, metric in enumerate(("per_token", "input", "output")):  # a rate with rejections is not served
            values = [p["latency_ms"][metric] if not p["rejected"] else math.inf for p in points]
            summary[f"throughput_{metric}"] = crossing(rates, values, slo[k])
    summary["p90_goodput"] = crossing(rates, [1.0 - p["slo_attainment"] for p in points], 0.1)
    key = "throughput_per_token" if slo else "p90_goodput"
    print(f"  {workload:9s} {name:16s} {key} = {summary[key]:.3f} req/s ({len(points)} rates)", flush=True)
    return summary, timeline


def run_workload(
    workload: str, systems: list[str], n: int, gpu: str, seed: int, timeline: dict, jobs: int, host_gib: float
) -> dict:
    """Every system's sweep of one workload, `jobs` systems at a time (separate processes)."""
    names = [s for s in systems if s not in CACHED or workload == "mooncake"]  # only the trace has hash ids
    args = [(workload, name, n, gpu, seed, host_gib) for name in names]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            done = list(pool.map(sweep, *zip(*args)))
    else:
        done = [sweep(*a) for a in args]
    for _, spans in done:
        if spans is not None:
            timeline[workload] = spans
    return {name: summary for name, (summary, _) in zip(names, done)}


def ratios(results: dict) -> dict:
    """ESP's figure over each other system's, next to the paper's ratios where it has them."""
    table = {}
    for workload, per_system in results.items():
        key = "throughput_per_token" if workload in SLO_MS else "p90_goodput"
        esp = per_system.get("esp", {}).get(key, 0.0)
        row = {}
        for name, s in per_system.items():
            if name == "esp":
                continue
            ours = esp / s[key] if s[key] > 0 else math.inf
            paper = PAPER.get(workload, {})
            theirs = paper["esp"] / paper[name] if name in paper else None
            row[name] = {"ours": ours, "paper": theirs}
        static = [per_system[s][key] for s in STATIC if s in per_system]
        if static:
            row["best_static"] = {"ours": esp / max(static) if max(static) > 0 else math.inf}
        if {"esp", "esp+cache", "esp+host", "esp+unbounded"} <= set(per_system):  # the host tier's share of the gain
            gain = {k: per_system[k][key] / per_system["esp"][key] for k in ("esp+cache", "esp+host", "esp+unbounded")}
            reach = (gain["esp+host"] - 1) / (gain["esp+unbounded"] - 1) if gain["esp+unbounded"] > 1 else math.nan
            row["host tier"] = {**gain, "share of the unbounded gain": reach}
        if "esp+cache" in per_system:  # elastic SP with its cache over each system (with theirs where they have one)
            cached = per_system["esp+cache"][key]
            row["esp+cache over"] = {
                name: cached / s[key] if s[key] > 0 else math.inf
                for name, s in per_system.items()
                if name != "esp+cache"
            }
        table[workload] = row
    return table


def plot(results: dict, timeline: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, workload in zip(axes[0], names):
        per_token = workload in SLO_MS  # else goodput: the share of requests meeting TTFT and TPOT targets
        for name, s in results[workload].items():
            rates = [p["rate"] for p in s["points"]]
            ys = [p["latency_ms"]["per_token"] if per_token else p["slo_attainment"] for p in s["points"]]
            ax.plot(rates, ys, marker="o", ms=3, label=name)
        ax.axhline(SLO_MS[workload][0] if per_token else 0.9, color="grey", ls="--", lw=0.8)
        if per_token:
            ax.set_yscale("log")
        ax.set_ylabel("normalised per-token latency (ms)" if per_token else "share meeting TTFT and TPOT targets")
        ax.set_title(workload)
        ax.set_xlabel("request rate (req/s)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cluster_sim_latency.png", dpi=120)
    plt.close(fig)
    if not timeline:
        return
    workload, spans = next(iter(timeline.items()))
    first = min(s.start for s in spans)
    draw(spans, 4, f"elastic SP on {workload} (the first 120 s)", out / "cluster_sim_timeline.png", first, 120.0)


def lru_hit_rate(workload: list, capacity_tokens: float) -> float:
    """Share of the prompt tokens an ideal least-recently-used cache of whole 512-token blocks holding
    `capacity_tokens` would serve (each request's longest cached run of blocks from its start): the most any
    prefix cache of that size can save on the trace, whatever the scheduling."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for req in workload:
        run = 0
        while run < len(req.hash_ids) and req.hash_ids[run] in lru:
            run += 1
        hit += min(run * BLOCK_TOKENS, req.input_len)
        total += req.input_len
        for h in req.hash_ids:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) * BLOCK_TOKENS > capacity_tokens:
            lru.popitem(last=False)
    return hit / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS + CACHED), choices=SYSTEMS + CACHED)
    ap.add_argument("--requests", type=int, default=200, help="requests per simulated run")
    ap.add_argument("--gpu", default="A800-80GB", choices=sorted(GPUS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--jobs", type=int, default=1, help="systems simulated at once, one process each")
    ap.add_argument(
        "--host-tier-gib", type=float, default=HOST_TIER_GIB, help="host memory for the '+host' systems' K/V per node"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, timeline = {}, {}
    t0 = time.perf_counter()
    for workload in args.workloads:
        if workload == "mooncake" and not TRACE.exists():
            print(f"  skipping mooncake: no trace at {TRACE}")
            continue
        results[workload] = run_workload(
            workload, args.systems, args.requests, args.gpu, args.seed, timeline, args.jobs, args.host_tier_gib
        )
    bound = None
    if "mooncake" in results:  # what a prefix cache can save at all on this trace
        wl = requests_for("mooncake", 1.0, args.requests, args.seed)
        pool = 4 * ClusterModel(GPUS[args.gpu], LLAMA2_7B, 4, 2).kv_tokens_per_instance  # elastic SP's pools
        host = int(args.host_tier_gib * 2**30 / LLAMA2_7B.kv_bytes_per_token)
        bound = {
            "pool_tokens": pool,
            "lru_hit_rate": lru_hit_rate(wl, pool),
            "host_tier_tokens": host,
            "lru_hit_rate_with_host_tier": lru_hit_rate(wl, pool + host),
            "unbounded": lru_hit_rate(wl, math.inf),
        }
        print(
            f"  mooncake: an ideal LRU cache of {pool:,} tokens would serve {bound['lru_hit_rate']:.1%} of the "
            f"prompt tokens, {bound['lru_hit_rate_with_host_tier']:.1%} with a host tier of {host:,} more "
            f"({args.host_tier_gib:g} GiB), {bound['unbounded']:.1%} with no size limit"
        )
    table = ratios(results)
    print("\nelastic SP over each system (ours | paper):")
    for workload, row in table.items():
        cells = []
        for name, v in row.items():
            if name in ("esp+cache over", "host tier"):
                cells.append(name + " " + ", ".join(f"{k} {x:.2f}x" for k, x in v.items()))
                continue
            paper = v.get("paper")
            cells.append(f"{name} {v['ours']:.2f}x" + (f" | {paper:.2f}x" if paper else ""))
        print(f"  {workload:9s} " + "; ".join(cells))
    doc = {
        "gpu": args.gpu,
        "model": LLAMA2_7B.name,
        "requests_per_run": args.requests,
        "host_tier_gib_per_node": args.host_tier_gib,
        "seed": args.seed,
        "results": results,
        "ratios": table,
        "mooncake_prefix_bound": bound,
        "wall_seconds": time.perf_counter() - t0,
    }
    (args.out / "cluster_sim.json").write_text(json.dumps(doc, indent=1))
    plot(results, timeline, args.out)
    print(f"\nwrote {args.out / 'cluster_sim.json'} and plots in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
