"""Where a decode step's time goes: a `jax.profiler` trace of the engine decoding, and its breakdown.

The engine decodes a batch (greedy, every request to the same length) under `jax.profiler.trace`; the
trace's device work (GPU kernels; on CPU the XLA thunks on the runtime's threads) is split by kind (matmuls,
attention kernels, gathers and scatters, copies, the rest), the device's busy time is the union of its
ops, and what is left of the decode's wall time is the host's share (gaps where the device waits for it).
All figures are per decode step. `benchmarks/gpu_serving.py --profile` runs the same on a GPU; this is its
CPU twin:

    python benchmarks/step_profile.py                       # SmolLM2's shape, random weights, batch 1 and 16
    python benchmarks/step_profile.py --model tiny --batches 1 64 --decode-steps 1 8
    python benchmarks/step_profile.py --decode-steps 1 --layers scan unrolled   # weights sliced / read in place
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loong_jax.model.sampling import SamplingParams  # noqa: E402

KINDS = (  # (kind, substrings of an op's name), first match wins
    ("attention kernels", ("pallas", "triton", "mosaic", "flash", "attention")),
    ("copies", ("copy", "memcpy", "dynamic-slice", "dynamic_slice", "dynamic-update-slice", "transpose")),
    ("matmuls", ("dot", "gemm", "cublas", "cutlass", "matmul", "convolution")),
    ("gathers and scatters", ("gather", "scatter")),
)
CPU_DEVICE_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")  # XLA:CPU runs programs' thunks on these
NOT_OPS = ("ThunkExecutor", "ThreadpoolListener", "end: ")
CONTROL = ("while", "conditional", "call")  # thunks around other ops: in the busy time, not in the sums


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def device_ops(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of every device op in the newest Perfetto trace under trace_dir."""
    path = max(
        glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime
    )
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"].get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"].get("name", "")
    ops = []
    for e in events:
        if e.get("ph") != "X" or e.get("dur") is None:
            continue
        on_gpu = processes.get(e["pid"], "").startswith("/device:GPU")
        on_cpu = threads.get((e["pid"], e.get("tid")), "").startswith(CPU_DEVICE_THREADS)
        if (on_gpu or on_cpu) and not e["name"].startswith(NOT_OPS):
            ops.append((e["name"], float(e["ts"]), float(e["dur"])))
    return ops


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def breakdown(ops: list[tuple[str, float, float]], wall_s: float, steps: int) -> dict:
    """Per decode step (ms): wall time, device busy time (and its fraction of the wall), op time by kind,
    the host's share (wall minus busy), and the ten costliest ops."""
    per_step = 1e3 / steps
    busy_s = union_length([(s, s + d) for _, s, d in ops]) / 1e6
    by_kind: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    for name, _, d in ops:
        if name.startswith(CONTROL):
            continue
        by_kind[kind_of(name)] += d / 1e6
        by_op[name] += d / 1e6
    return {
        "steps": steps,
        "wall_ms_per_step": wall_s * per_step,
        "device_busy_ms_per_step": busy_s * per_step,
        "device_busy_fraction": busy_s / wall_s,
        "host_gaps_ms_per_step": max(0.0, wall_s - busy_s) * per_step,
        "op_ms_per_step_by_kind": {k: v * per_step for k, v in by_kind.most_common()},
        "top_ops_ms_per_step": {k: v * per_step for k, v in by_op.most_common(10)},
    }


def profile_decode(engine, vocab: int, batch: int, new_tokens: int, trace_dir: str, prompt_len: int = 16) -> dict:
    """Trace `batch` requests decoding new_tokens each (after an untimed run that compiles) and break the
    decode down. The prefill is excluded: the requests are prefilled first and the trace starts once all
    of them hold their first token."""
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)

    def run(trace: bool) -> tuple[float, int]:
        engine.prefix_cache.flush()
        reqs = [engine.add_request(rng.integers(1, vocab, prompt_len).tolist(), params) for _ in range(batch)]
        while not all(r.output_ids for r in reqs):
            engine.step()
        launches = engine.stats.decode_launches
        if trace:  # device ops and the runtime's own events; not every Python call (that would slow the host)
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        wall = time.perf_counter() - t0
        if trace:
            jax.profiler.stop_trace()
        return wall, engine.stats.decode_launches - launches

    run(False)
    wall, launches = run(True)
    out = breakdown(device_ops(trace_dir), wall, new_tokens)
    out.update(batch=batch, decode_launches=launches, decode_steps=engine.ecfg.decode_steps, trace_dir=trace_dir)
    return out


def show(label: str, b: dict) -> None:
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in b["op_ms_per_step_by_kind"].items())
    print(
        f"{label}: {b['wall_ms_per_step']:.3f} ms a step, device busy {b['device_busy_fraction']:.0%} "
        f"({b['device_busy_ms_per_step']:.3f} ms), host gaps {b['host_gaps_ms_per_step']:.3f} ms; ops (ms a step, "
        f"summed over threads): {kinds}",
        flush=True,
    )


def main() -> None:
    from gpu_serving import SHAPES, TINY

    from loong_jax.engine import EngineConfig, build_engine
    from loong_jax.model.llama import Llama

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2-135m"], default="smollm2-135m")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request in the traced decode")
    ap.add_argument(
        "--layers", nargs="+", default=["default"], choices=["default", "scan", "unrolled"], help="layer loops to try"
    )
    ap.add_argument("--trace-dir", default=os.path.join(os.path.dirname(__file__), "results", "traces"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_profile_cpu.json"))
    args = ap.parse_args()
    cfg = TINY if args.model == "tiny" else SHAPES[args.model]
    graphdef, state = nnx.split(Llama(cfg, jnp.float32, nnx.Rngs(0)))
    rows = []
    for layers in args.layers:
        unroll = {"default": None, "scan": False, "unrolled": True}[layers]
        for steps in args.decode_steps:
            ecfg = EngineConfig(
                max_model_len=256,
                max_num_seqs=max(args.batches),
                kv_tokens_per_instance=8192,
                decode_steps=steps,
                unroll_layers=unroll,
            )
            engine = build_engine(cfg, graphdef, state, None, ecfg, jnp.float32, seed=0)
            for b in args.batches:
                trace_dir = os.path.join(args.trace_dir, f"{layers}_k{steps}_b{b}")
                row = profile_decode(engine, cfg.vocab_size, b, args.tokens, trace_dir)
                row["layers"] = layers
                show(f"{args.model}, layers {layers}, decode_steps {steps}, batch {b}", row)
                rows.append(row)
    report = {
        "benchmark": "step_profile",
        "date": time.strftime("%Y-%m-%d"),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "model": args.model,
        "runs": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
