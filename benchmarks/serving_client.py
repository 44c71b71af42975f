"""Serving benchmark: stream requests over HTTP and report what the field reports.

Arrivals: Poisson or gamma at --rate requests/s, or a fixed --concurrency. Lengths: random, a JSONL file
of {"input_length", "output_length"}, or the Mooncake conversation trace (lengths scaled to the model's
context). Reports successes/failures, duration, request and token throughput, TTFT, TPOT, inter-token and
end-to-end latency (mean, median, p99), goodput under SLOs, and the LoongServe paper's normalised
latencies. With --compare-transformers it also generates the same requests one at a time with Hugging
Face transformers in this process and prints the throughput ratio.

    python benchmarks/serving_client.py                              # starts a 4-instance server itself
    python benchmarks/serving_client.py --url http://127.0.0.1:8000 --rate 2 --source mooncake
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time

import httpx
import numpy as np

TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mooncake_conversation_trace.jsonl")


@dataclasses.dataclass
class Result:
    input_len: int
    output_len: int = 0
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    chunk_times: list[float] = dataclasses.field(default_factory=list)


def workload(args, max_len: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(input_len, output_len) pairs that fit in max_len."""
    if args.source == "random":
        ins = rng.integers(args.min_input, args.max_input + 1, args.num_requests)
        outs = np.full(args.num_requests, args.output_len)
        pairs = list(zip(ins.tolist(), outs.tolist()))
    else:
        path = TRACE if args.source == "mooncake" else args.source
        with open(path) as f:
            rows = [json.loads(line) for line in f][: args.num_requests]
        pairs = [(int(r["input_length"]), int(r["output_length"])) for r in rows]
        top = max(i + o for i, o in pairs)
        if top > max_len:  # scale the trace's lengths to the model's context
            scale = (max_len - 1) / top
            pairs = [(max(1, int(i * scale)), max(1, int(o * scale))) for i, o in pairs]
    return [(i, min(o, max_len - i)) for i, o in pairs]


def arrivals(args, n: int, rng: np.random.Generator) -> list[float]:
    if args.rate <= 0:
        return [0.0] * n
    if args.arrival == "gamma":
        gaps = rng.gamma(args.burstiness, 1.0 / (args.rate * args.burstiness), n)
    else:
        gaps = rng.exponential(1.0 / args.rate, n)
    return np.cumsum(gaps).tolist()


async def one(client, url, model, prompt, out_len, result: Result, t0: float) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": out_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result.start = time.perf_counter() - t0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter() - t0
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    if not result.chunk_times:
                        result.ttft = now - result.start
                    result.chunk_times.append(now)
        result.e2e = time.perf_counter() - t0 - result.start
        result.ok = result.output_len > 0
    except httpx.HTTPError as e:
        result.error = repr(e)


async def run_load(args, url: str, model: str, reqs, prompts) -> tuple[list[Result], float]:
    rng = np.random.default_rng(args.seed + 1)
    times = arrivals(args, len(reqs), rng)
    results = [Result(i) for i, _ in reqs]
    limit = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    t0 = time.perf_counter()

    async def launch(k: int) -> None:
        await asyncio.sleep(max(0.0, times[k] - (time.perf_counter() - t0)))
        if limit:
            async with limit:
                await one(client, url, model, prompts[k], reqs[k][1], results[k], t0)
        else:
            await one(client, url, model, prompts[k], reqs[k][1], results[k], t0)

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=httpx.Limits(max_connections=1000)) as client:
        await asyncio.gather(*(launch(k) for k in range(len(reqs))))
    return results, time.perf_counter() - t0


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p99": float(np.percentile(values, 99)),
    }


def report(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    good = [
        r for r in ok if r.ttft <= slo_ttft and (r.output_len <= 1 or (r.e2e - r.ttft) / (r.output_len - 1) <= slo_tpot)
    ]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    return {
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_s": stats([r.ttft for r in ok]),
        "tpot_s": stats(tpot),
        "itl_s": stats(itl),
        "e2e_s": stats([r.e2e for r in ok]),
        "goodput_requests_per_s": len(good) / duration,
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        # The LoongServe paper's metrics (seconds per token).
        "normalized_per_token_latency": statistics.fmean([r.e2e / (r.input_len + r.output_len) for r in ok])
        if ok
        else None,
        "normalized_input_latency": statistics.fmean([r.ttft / r.input_len for r in ok]) if ok else None,
        "normalized_output_latency": statistics.fmean(tpot) if tpot else None,
    }


def start_server(args):
    """A server on loopback in this process (the same code `loong serve` runs)."""
    from loong_jax import LLM, use_virtual_cpu_devices

    use_virtual_cpu_devices(args.instances)
    from serving.app import build_app
    from serving.server import build_server, start_in_thread

    llm = LLM(
        num_instances=args.instances,
        kv_tokens_per_instance=args.kv_tokens,
        max_num_seqs=max(16, args.concurrency),
        policy=args.policy,
        **({} if args.decode_steps is None else {"decode_steps": args.decode_steps}),
    )
    if args.warmup:
        llm.warmup(show_progress=False)
    server, _ = build_server(llm, "default")
    url, uv = start_in_thread(build_app(server))
    return url, llm, uv


def transformers_one_at_a_time(prompts, reqs) -> dict:
    """The same requests through Hugging Face transformers, one at a time (the peer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from checkpoints import default_model_path

    path = default_model_path()
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for prompt, (_, out_len) in zip(prompts, reqs):
            model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=out_len, min_new_tokens=out_len, pad_token_id=2
            )
            tokens += out_len
    dt = time.perf_counter() - t0
    return {"output_tokens": tokens, "duration_s": dt, "output_token_throughput": tokens / dt}


def plot(results: list[Result], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].scatter([r.input_len for r in ok], [r.ttft for r in ok], s=10)
    axes[0].set(xlabel="input tokens", ylabel="TTFT (s)", title="Time to first token")
    for r in ok:
        axes[1].plot([r.start, r.start + r.e2e], [r.input_len, r.input_len], lw=1)
    axes[1].set(xlabel="time (s)", ylabel="input tokens", title="Request lifetimes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an existing server (default: start one in this process)")
    ap.add_argument("--model", default=None, help="model name for the API (default: the server's)")
    ap.add_argument("--instances", type=int, default=4, help="instances of the in-process server")
    ap.add_argument("--kv-tokens", type=int, default=16384)
    ap.add_argument("--warmup", action="store_true", help="warm the in-process server up first")
    ap.add_argument("--policy", choices=["elastic", "shared"], default="elastic", help="in-process server's policy")
    ap.add_argument("--decode-steps", type=int, default=None, help="in-process server's most decode steps per launch")
    ap.add_argument("--source", default="random", help="random | mooncake | path to a JSONL of lengths")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--min-input", type=int, default=32)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (0: all at once, bounded by concurrency)")
    ap.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    ap.add_argument("--concurrency", type=int, default=16, help="max requests in flight (0: unbounded)")
    ap.add_argument("--slo-ttft", type=float, default=10.0)
    ap.add_argument("--slo-tpot", type=float, default=0.5)
    ap.add_argument("--compare-transformers", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"))
    args = ap.parse_args()

    uv = None
    if args.url is None:
        url, llm, uv = start_server(args)
        max_len, vocab = llm.engine.ecfg.max_model_len, llm.config.vocab_size
    else:
        url = args.url
        info = httpx.get(f"{url}/v1/models").json()["data"][0]
        max_len, vocab = info.get("max_model_len", 8192), 49152
    model = args.model or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    rng = np.random.default_rng(args.seed)
    reqs = workload(args, max_len, rng)
    prompts = [rng.integers(3, vocab, i).tolist() for i, _ in reqs]
    results, duration = asyncio.run(run_load(args, url, model, reqs, prompts))
    summary = report(results, duration, args.slo_ttft, args.slo_tpot)
    summary["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    if args.compare_transformers:
        peer = transformers_one_at_a_time(prompts, reqs)
        summary["transformers_one_at_a_time"] = peer
        summary["throughput_ratio_vs_transformers"] = (
            summary["output_token_throughput"] / peer["output_token_throughput"]
        )
        print(
            f"output tokens/s: loong-jax {summary['output_token_throughput']:.1f} at concurrency {args.concurrency} "
            f"vs transformers one at a time {peer['output_token_throughput']:.1f} "
            f"({summary['throughput_ratio_vs_transformers']:.2f}x)"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.out}")
    plot(results, os.path.splitext(args.out)[0] + ".png")
    if uv is not None:
        uv.should_exit = True


if __name__ == "__main__":
    main()
