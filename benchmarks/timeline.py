"""Elastic sequence parallelism, seen happening: which instances ran which group, when.

Draws a timeline of one run (instances on one axis, time on the other): every prefill and decode group
is a coloured span over its instances, instances that computed a prefill but keep none of its K/V are
hatched (a scale-down), a triangle marks an instance taking a decoding request it held none of (a
scale-up) and arrows mark migrations. Two sources, one drawing:

    .venv/bin/python benchmarks/timeline.py                  # simulated 4 x (2 x A800), the Mixed workload
    .venv/bin/python benchmarks/timeline.py --source engine  # the real engine: SmolLM2 on 4 CPU instances

Writes the picture (PNG) and the spans (JSON in benchmarks/results/, redrawn with `--from-json`). The
README's picture: `benchmarks/timeline.py --seconds 70 --out docs/timeline.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from loong_jax.runtime.timeline import Span, Timeline

HERE = Path(__file__).resolve().parent
COLOURS = {"prefill": "#f28e2b", "decode": "#4e79a7", "migrate": "#e15759"}


def merge_decodes(spans: list[Span], gap: float) -> list[Span]:
    """Back-to-back decode steps of one group drawn as one span (thousands of slivers otherwise)."""
    out: list[Span] = []
    last: dict[tuple[int, ...], Span] = {}
    for s in sorted(spans, key=lambda s: s.start):
        prev = last.get(s.group)
        if s.kind == "decode" and prev is not None and prev.end is not None and s.start - prev.end <= gap:
            prev.end = s.end
            prev.requests = max(prev.requests, s.requests)
            prev.scaled_up = tuple(sorted(set(prev.scaled_up) | set(s.scaled_up)))
            continue
        s = dataclasses.replace(s)
        out.append(s)
        if s.kind == "decode":
            last[s.group] = s
        else:
            for g in list(last):  # an instance of the group ran something else: the next step starts anew
                if set(g) & set(s.group):
                    del last[g]
    return out


def _runs(rows: list[int]) -> list[list[int]]:
    """Sorted instance ids split into runs of consecutive ids."""
    runs: list[list[int]] = []
    for i in rows:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def draw(spans: list[Span], instances: int, title: str, path: Path, start: float = 0.0, seconds: float = 0.0):
    """The timeline of `spans` between `start` and `start + seconds` (0: to the last span) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    done = [s for s in spans if s.end is not None]
    end = start + seconds if seconds else max(s.end for s in done)
    shown = [s for s in done if s.end > start and s.start < end]
    gap = 0.002 * (end - start)
    fig, ax = plt.subplots(figsize=(12, 0.45 * instances + 1.6))
    for s in merge_decodes(shown, gap):
        left, width = max(s.start, start), min(s.end, end) - max(s.start, start)
        rows = sorted(s.group)
        runs = _runs(rows) if s.kind != "migrate" else [[i] for i in rows]
        for run in runs:  # one box per run of adjacent instances: a group reads as one program
            box = mpatches.Rectangle((left, run[0] - 0.4), width, len(run) - 0.2, lw=0.5, edgecolor="black")
            box.set_facecolor(COLOURS[s.kind])
            ax.add_patch(box)
        if len(runs) > 1 and s.kind != "migrate":  # a group of instances that are not adjacent
            ax.plot([left, left], [rows[0] - 0.4, rows[-1] + 0.4], color="black", lw=1.0)
        if s.kind == "prefill":
            for run in runs:  # computed here, K/V kept elsewhere: scale-down
                for i in set(run) - set(s.kept or rows):
                    top, bottom = max(i - 0.5, run[0] - 0.4), min(i + 0.5, run[-1] + 0.4)
                    hatch = mpatches.Rectangle((left, top), width, bottom - top, fc="white", alpha=0.55, hatch="///")
                    hatch.set_linewidth(0)
                    ax.add_patch(hatch)
            if width > 0.05 * (end - start):
                label = f"prefill on {len(rows)}" + (f", K/V kept on {len(s.kept)}" if s.scale_down else "")
                ax.text(left + width / 2, rows[0], label, ha="center", va="center", fontsize=7, zorder=5)
        for i in s.scaled_up:
            ax.plot(left, i - 0.4, marker="v", color="#59a14f", markersize=7, markeredgecolor="black", mew=0.5)
        if s.kind == "migrate":
            src, dst = s.group
            ax.annotate("", xy=(left, dst), xytext=(left, src), arrowprops={"arrowstyle": "->", "color": "#e15759"})
    ax.set_xlim(start, end)
    ax.set_ylim(-0.6, instances - 0.4)
    ax.set_yticks(range(instances))
    ax.set_yticklabels([f"instance {i}" for i in range(instances)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=10)
    handles = [
        mpatches.Patch(color=COLOURS["prefill"], label="prefill (striped ring over the group)"),
        mpatches.Patch(facecolor="#f9c795", hatch="///", label="computed, keeps no K/V: scale-down"),
        mpatches.Patch(color=COLOURS["decode"], label="decode (multi-master over the group)"),
        Line2D([], [], marker="v", color="#59a14f", ls="", markeredgecolor="black", label="scale-up: a new master"),
        mpatches.Patch(color=COLOURS["migrate"], label="migration"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def simulated(workload: str, requests: int, rate: float, gpu: str) -> tuple[list[Span], int, str]:
    """Elastic SP on the simulated cluster of `cluster_sim.py` (the paper's 8 GPUs as 4 instances of 2)."""
    sys.path.insert(0, str(HERE))
    from cluster_sim import requests_for, system

    from loong_jax.simulation.simulate import simulate

    wl = requests_for(workload, rate, requests, seed=0)
    cluster, policy = system("esp", gpu, workload)
    res = simulate(cluster, policy, wl, record=True)
    lengths = sorted(w.input_len for w in wl)
    title = (
        f"elastic SP, simulated {cluster.num_instances} instances of 2 x {gpu}, {workload} workload: "
        f"{len(res.served)} requests of {lengths[0]:,}-{lengths[-1]:,} tokens"
    )
    return res.spans, cluster.num_instances, title


def engine_run(instances: int, prompts: int, seed: int) -> tuple[list[Span], int, str]:
    """The real engine (SmolLM2-135M on virtual CPU instances, elastic scheduler) serving prompts of mixed
    lengths; the timeline starts after warm-up."""
    import numpy as np

    from loong_jax import LLM, SamplingParams, use_virtual_cpu_devices

    use_virtual_cpu_devices(instances)
    llm = LLM(num_instances=instances, kv_tokens_per_instance=4096, max_num_seqs=16, max_prefill_tokens=1024)
    llm.warmup()
    rng = np.random.default_rng(seed)
    text = " ".join(p.read_text() for p in sorted((HERE.parent / "loong_jax").glob("**/*.py")))
    ids = llm.tokenizer.encode(text)
    lengths = np.exp(rng.uniform(np.log(20), np.log(3000), prompts)).astype(int)
    batch = [ids[k : k + n] for k, n in zip(rng.integers(0, len(ids) - 3000, prompts), lengths)]
    timeline = llm.engine.record_timeline()
    t0 = llm.engine.executor.now()
    llm.generate(batch, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    spans = [dataclasses.replace(s, start=s.start - t0, end=s.end - t0) for s in timeline.spans if s.end is not None]
    title = f"the engine: SmolLM2-135M on {instances} virtual CPU instances, {prompts} prompts of 20-3,000 tokens"
    return spans, instances, title


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("sim", "engine"), default="sim")
    ap.add_argument("--workload", default="mixed", help="sim: a workload of cluster_sim.py (mixed, mooncake, ...)")
    ap.add_argument("--requests", type=int, default=60, help="sim: requests to replay")
    ap.add_argument("--rate", type=float, default=0.55, help="sim: requests/s (mooncake: a multiple of its rate)")
    ap.add_argument("--gpu", default="A800-80GB", help="sim: the GPU of the simulated cluster")
    ap.add_argument("--instances", type=int, default=4, help="engine: virtual CPU instances")
    ap.add_argument("--prompts", type=int, default=12, help="engine: prompts served")
    ap.add_argument("--start", type=float, default=0.0, help="first second drawn")
    ap.add_argument("--seconds", type=float, default=0.0, help="seconds drawn (0: the whole run)")
    ap.add_argument("--from-json", type=Path, help="draw a saved timeline instead of running one")
    ap.add_argument("--out", type=Path, help="PNG to write (default: benchmarks/results/timeline_<source>.png)")
    args = ap.parse_args()
    out = args.out or HERE / "results" / f"timeline_{args.source}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    (HERE / "results").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if args.from_json:
        spans, meta = Timeline.load(args.from_json)
        instances, title = int(meta["instances"]), str(meta["title"])
    elif args.source == "sim":
        spans, instances, title = simulated(args.workload, args.requests, args.rate, args.gpu)
    else:
        spans, instances, title = engine_run(args.instances, args.prompts, seed=0)
    if not args.from_json:
        saved = Timeline(max(1, len(spans)))
        saved.spans.extend(spans)
        saved.save(HERE / "results" / f"timeline_{args.source}.json", instances=instances, title=title)
    draw(spans, instances, title, out, args.start, args.seconds)
    kinds = {k: sum(s.kind == k for s in spans) for k in COLOURS}
    summary = {
        "spans": kinds,
        "scale_downs": sum(s.scale_down for s in spans),
        "scale_ups": sum(len(s.scaled_up) for s in spans),
        "prefill_degrees": sorted({len(s.group) for s in spans if s.kind == "prefill"}),
        "decode_degrees": sorted({len(s.group) for s in spans if s.kind == "decode"}),
    }
    print(json.dumps(summary))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
