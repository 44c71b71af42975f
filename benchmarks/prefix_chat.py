"""Multi-turn chat over HTTP with the prefix cache on vs off (or, with --compare host-tier, with the prefix
cache's host-memory tier against the pools only), same run, same server options.

Conversations run concurrently; each sends its turns one after another, every turn resending the whole
history (a long document as the system message, earlier questions and answers). Measured per server: time
to first token of the first turn and of the later turns, the prompt tokens the server reports as cached
(`usage.prompt_tokens_details.cached_tokens`), and total throughput (prompt + completion tokens per second
of the whole workload). A first round of different conversations warms the server (compiles the shapes
the workload uses) and is not counted. Results: JSON in benchmarks/results/prefix_chat.json and a plot.

    .venv/bin/python benchmarks/prefix_chat.py                 # 8 conversations x 6 turns, about 20 minutes
    .venv/bin/python benchmarks/prefix_chat.py --quick         # 2 x 3, to try it
    .venv/bin/python benchmarks/prefix_chat.py --compare host-tier   # 16 conversations, pools too small
                                    # for them: each history is evicted before its next turn
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_process import serve  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORDS = (
    "harbour lamp keeper storm tide reef lens tower light signal ship fog rock coast island beacon night "
    "wave wind chart cliff lantern oil brass mirror glass rotation flash season winter log record crew "
    "supply boat channel north south east west mile fathom anchor rope bell horn weather gale calm dawn"
).split()


def document(rng: np.random.Generator, words: int) -> str:
    """A made-up document of about `words` words (sentences of random words from a small vocabulary)."""
    out = []
    while len(out) < words:
        sentence = rng.choice(WORDS, rng.integers(6, 14)).tolist()
        out += [sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."]
    return " ".join(out)


@dataclasses.dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float = float("nan")
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


async def chat_turn(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, turn: Turn) -> str:
    """One streamed chat completion; returns the answer's text."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, text = time.perf_counter(), []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            turn.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return ""
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                turn.error = chunk["error"]["message"]
                return ""
            if chunk.get("usage"):
                usage = chunk["usage"]
                turn.prompt_tokens, turn.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                turn.cached_tokens = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                if piece and np.isnan(turn.ttft):
                    turn.ttft = time.perf_counter() - start
                text.append(piece)
    return "".join(text)


async def conversations(url: str, args, seed: int) -> tuple[list[Turn], float]:
    """args.conversations conversations of args.turns turns each, all at once; returns turns and seconds."""
    rng = np.random.default_rng(seed)
    docs = [document(rng, args.document_words) for _ in range(args.conversations)]
    turns: list[Turn] = []

    async def talk(c: int, client: httpx.AsyncClient) -> None:
        messages = [{"role": "system", "content": f"Answer questions about this log.\n\n{docs[c]}"}]
        for t in range(args.turns):
            question = f"Question {t + 1}: " + document(rng, args.question_words)
            messages.append({"role": "user", "content": question})
            turn = Turn(c, t)
            turns.append(turn)
            answer = await chat_turn(client, url, messages, args.max_tokens, turn)
            messages.append({"role": "assistant", "content": answer})

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as client:
        await asyncio.gather(*(talk(c, client) for c in range(args.conversations)))
    return turns, time.perf_counter() - t0


def summary(turns: list[Turn], seconds: float) -> dict:
    ok = [t for t in turns if t.error is None]
    first = [t.ttft for t in ok if t.turn == 0]
    later = [t.ttft for t in ok if t.turn > 0]
    tokens = sum(t.prompt_tokens + t.completion_tokens for t in ok)
    return {
        "turns": len(turns),
        "errors": [t.error for t in turns if t.error is not None],
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "prompt_tokens": sum(t.prompt_tokens for t in ok),
        "cached_tokens": sum(t.cached_tokens for t in ok),
        "mean_prompt_tokens_later_turns": statistics.fmean(t.prompt_tokens for t in ok if t.turn > 0) if later else 0,
        "ttft_first_turn_mean": statistics.fmean(first) if first else float("nan"),
        "ttft_later_turns_mean": statistics.fmean(later) if later else float("nan"),
        "ttft_later_turns_median": statistics.median(later) if later else float("nan"),
        "ttft_by_turn": [
            statistics.fmean([t.ttft for t in ok if t.turn == k] or [float("nan")])
            for k in range(max(t.turn for t in turns) + 1)
        ],
    }


def cache_counters(url: str) -> dict[str, float]:
    """The server's prefix-cache counters (pools and host tier) from /metrics."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("loong:prefix_cache_") and line.split(" ")[0].endswith("_total"):
            name, value = line.split(" ")
            out[name.removeprefix("loong:prefix_cache_").removesuffix("_total")] = float(value)
    return out


def plot(results: dict, path: str, compare: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, res in results.items():
        ttft = res["ttft_by_turn"]
        ax.plot(range(1, len(ttft) + 1), ttft, marker="o", label=name)
    ax.set_xlabel("turn")
    ax.set_ylabel("mean time to first token (s)")
    pair = "host tier vs pools only" if compare == "host-tier" else "prefix cache on vs off"
    ax.set_title(f"multi-turn chat: {pair}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# The two servers compared: the first with the feature, the second without; the same options otherwise.
COMPARE = {
    "cache": (("cache on", []), ("cache off", ["--no-prefix-caching"])),
    "host-tier": (("host tier", []), ("pools only", ["--host-kv-cache-gib", "0"])),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=sorted(COMPARE), default="cache")
    p.add_argument("--conversations", type=int, default=None, help="default 8 (host-tier: 16)")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--document-words", type=int, default=900, help="about 1.1K tokens of history to start with")
    p.add_argument("--question-words", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-instances", type=int, default=4)
    p.add_argument("--kv-tokens-per-instance", type=int, default=None, help="default 16384 (host-tier: 4096)")
    p.add_argument("--policy", default="elastic")
    p.add_argument("--quick", action="store_true", help="2 conversations x 3 turns")
    p.add_argument("--output", default=None, help="default results/prefix_chat.json (host-tier: _host_tier)")
    args = p.parse_args()
    host = args.compare == "host-tier"
    args.conversations = args.conversations or (16 if host else 8)
    args.kv_tokens_per_instance = args.kv_tokens_per_instance or (4096 if host else 16384)
    args.output = args.output or os.path.join(RESULTS, "prefix_chat_host_tier.json" if host else "prefix_chat.json")
    if args.quick:
        args.conversations, args.turns = 2, 3
    server = [
        "--num-instances", str(args.num_instances), "--kv-tokens-per-instance", str(args.kv_tokens_per_instance),
        "--max-num-seqs", "16", "--max-prefill-tokens", "2048", "--max-model-len", "4096", "--policy", args.policy,
    ]  # fmt: skip
    results = {}
    (with_name, _), (without_name, _) = COMPARE[args.compare]
    for name, extra in COMPARE[args.compare]:
        with serve(server + extra) as (url, _):
            asyncio.run(conversations(url, args, seed=1))  # warm-up round, other documents
            before = cache_counters(url)
            turns, seconds = asyncio.run(conversations(url, args, seed=0))
            after = cache_counters(url)
        results[name] = summary(turns, seconds)
        results[name]["prefix_cache"] = {k: after[k] - before.get(k, 0.0) for k in after}  # this round's
        r = results[name]
        print(
            f"{name}: {r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tokens/s, TTFT first turn "
            f"{r['ttft_first_turn_mean']:.2f} s, later turns {r['ttft_later_turns_mean']:.2f} s "
            f"(median {r['ttft_later_turns_median']:.2f}), cached {r['cached_tokens']} of {r['prompt_tokens']} "
            f"prompt tokens, errors {len(r['errors'])}"
        )
    on, off = results[with_name], results[without_name]
    results["ratios"] = {  # how many times faster the first server is than the second
        "ttft_later_turns": off["ttft_later_turns_mean"] / on["ttft_later_turns_mean"],
        "ttft_later_turns_median": off["ttft_later_turns_median"] / on["ttft_later_turns_median"],
        "throughput": on["tokens_per_s"] / off["tokens_per_s"],
    }
    results["settings"] = {**vars(args), "server": server}
    print(
        f"later turns' TTFT {results['ratios']['ttft_later_turns']:.2f}x faster with {with_name} than "
        f"{without_name} (median {results['ratios']['ttft_later_turns_median']:.2f}x), "
        f"throughput {results['ratios']['throughput']:.2f}x"
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    plot({k: results[k] for k in (with_name, without_name)}, args.output.replace(".json", ".png"), args.compare)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
