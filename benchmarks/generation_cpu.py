"""Single-instance generation speed on SmolLM2-135M versus Hugging Face transformers, in one process.

Measures single-stream decode tokens/s and the time of a 2048-token prefill for both, reports compile
time separately, prints the ratios and writes JSON. The engine runs with each of the given decode burst
sizes (1: a launch and a read per token; the default: bursts, each dispatched before the last is read) and
layer loops (unrolled over per-layer weights, or a scan over stacked weights).
Run: `python benchmarks/generation_cpu.py` (`--decode-steps 1 8 --layers unrolled scan`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

TEXT = (
    "The river wound through the valley, past farms and villages whose names had changed many times over "
    "the centuries. Travellers wrote about its bridges, its floods and the markets held on its banks. "
)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_loong(prompt_ids: list[int], decode_tokens: int, repeats: int, decode_steps: int, layers: str) -> dict:
    from loong_jax import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        kv_tokens_per_instance=16384,
        compilation_cache_dir=None,
        decode_steps=decode_steps,
        unroll_layers=layers == "unrolled",
    )
    load_s = time.perf_counter() - t0
    one = SamplingParams(max_tokens=1, temperature=0)
    many = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    short = prompt_ids[:16]
    t0 = time.perf_counter()
    llm.generate(prompt_ids, one)
    llm.generate(short, many)
    compile_s = time.perf_counter() - t0
    compiles = llm.engine.executor.programs.compiles

    def prefill():  # the whole prompt computed: the prefix cache holds it from the runs before
        llm.engine.prefix_cache.flush()
        llm.generate(prompt_ids, one)

    prefill_s = timed(prefill, repeats)
    first_s = timed(lambda: llm.generate(short, one), repeats)
    total_s = timed(lambda: llm.generate(short, many), repeats)
    assert llm.engine.executor.programs.compiles == compiles, "timed runs must not compile"
    return {
        "load_s": load_s,
        "compile_and_first_run_s": compile_s,
        "programs_compiled": compiles,
        "prefill_2048_s": prefill_s,
        "decode_tokens_per_s": decode_tokens / (total_s - first_s),
    }


def bench_transformers(prompt_ids: list[int], decode_tokens: int, repeats: int, gguf_path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids])
    short = ids[:, :16]

    def prefill():
        with torch.no_grad():
            model(ids, logits_to_keep=1)

    def gen(n):
        with torch.no_grad():
            model.generate(short, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=2)

    prefill()
    gen(2)
    prefill_s = timed(prefill, repeats)
    first_s = timed(lambda: gen(1), repeats)
    total_s = timed(lambda: gen(decode_tokens + 1), repeats)
    return {"load_s": load_s, "prefill_2048_s": prefill_s, "decode_tokens_per_s": decode_tokens / (total_s - first_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8], help="the engine's burst sizes to try")
    ap.add_argument(
        "--layers",
        nargs="+",
        default=["scan", "unrolled"],
        choices=["unrolled", "scan"],
        help="the layer loops to try (the first: the headline figure; scan is the CPU default)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generation_cpu.json"))
    args = ap.parse_args()

    from checkpoints import default_model_path
    from checkpoints.gguf_file import load_gguf

    path = default_model_path()
    tok = load_gguf(path)[2]
    ids = tok.encode(TEXT * 200)[: args.prompt_tokens]
    assert len(ids) == args.prompt_tokens

    runs = {
        f"decode_steps={k} layers={layers}": bench_loong(ids, args.decode_tokens, args.repeats, k, layers)
        for layers in args.layers
        for k in args.decode_steps
    }
    ref = bench_transformers(ids, args.decode_tokens, args.repeats, path)
    ours = runs[f"decode_steps={args.decode_steps[-1]} layers={args.layers[0]}"]
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "decode_steps": args.decode_steps[-1],
        "layers": args.layers[0],
        "loong_jax": ours,
        "loong_jax_by_run": runs,
        "decode_speedup_by_run": {k: r["decode_tokens_per_s"] / ref["decode_tokens_per_s"] for k, r in runs.items()},
        "transformers": ref,
        "decode_speedup": ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
        "prefill_time_ratio": ours["prefill_2048_s"] / ref["prefill_2048_s"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    for k, r in runs.items():
        speedup = result["decode_speedup_by_run"][k]
        print(
            f"{k}: {r['decode_tokens_per_s']:.1f} tok/s ({speedup:.2f}x transformers), "
            f"prefill {r['prefill_2048_s']:.2f} s, compile and first run {r['compile_and_first_run_s']:.1f} s"
        )
    print(
        f"decode (decode_steps {args.decode_steps[-1]}): {ours['decode_tokens_per_s']:.1f} vs "
        f"{ref['decode_tokens_per_s']:.1f} tok/s "
        f"({result['decode_speedup']:.2f}x, target >= 1.5x); prefill {args.prompt_tokens}: "
        f"{ours['prefill_2048_s']:.2f} vs {ref['prefill_2048_s']:.2f} s "
        f"({result['prefill_time_ratio']:.2f}x the time, target <= 0.67x); "
        f"compile + first run {ours['compile_and_first_run_s']:.1f} s for {ours['programs_compiled']} programs"
    )


if __name__ == "__main__":
    main()
