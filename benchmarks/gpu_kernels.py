"""The Pallas attention kernels on a GPU: correctness against the XLA reference, then speed side by side.

* ring-step prefill kernel: TFLOP/s against `jax.nn.dot_product_attention(implementation="cudnn")` and the
  XLA reference on the same shapes (one causal request of 8K and 32K tokens; 16 packed prompts of 512-4K),
  bf16, head dim 128, 32 query heads on 8 KV heads; a few tile shapes are tried and each is reported;
* paged decode kernel: achieved HBM bandwidth (K/V bytes read / time) against the device's peak and the XLA
  reference, batch 1-256 x context 1K-128K (combinations that fit the pool).

Each section is guarded: a failure is recorded in the JSON and the next section runs. `--quick` runs tiny
shapes in interpret mode on CPU (to check the script itself).

    python benchmarks/gpu_kernels.py --out results/gpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import paged_decode, reference, ring_attention  # noqa: E402

PEAK_HBM = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, published


def timed(fn, *args, iters: int = 5, repeats: int = 3) -> float:
    """Best mean seconds per call over `repeats` runs of `iters` calls (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def packed(lengths, heads, kv_heads, dim, dtype, seed=0):
    """A packed batch of prompts: q [T, H, D], k, v [T, KV, D], positions and segment ids [T]."""
    pad = -int(sum(lengths)) % 256  # the reference takes whole tiles: padding tokens of no request
    t = int(sum(lengths)) + pad
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(pad, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)]).astype(np.int32)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (t, heads, dim), dtype)
    k = jax.random.normal(kk, (t, kv_heads, dim), dtype)
    v = jax.random.normal(kv, (t, kv_heads, dim), dtype)
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def causal_flops(lengths, heads, dim) -> float:
    """Useful matmul flops of causal attention (QK and PV, the visible half)."""
    return sum(4.0 * n * (n + 1) / 2 * heads * dim for n in lengths)


def compare(out, lse, ref_out, ref_lse) -> dict:
    """Largest differences from the reference, whether the -inf rows agree, and whether any output is NaN."""
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    fin = np.isfinite(ref_lse)
    return {
        "max_abs_out": float(np.abs(out - ref_out).max()),
        "max_abs_lse": float(np.abs(lse[fin] - ref_lse[fin]).max()),
        "same_neg_inf": bool(np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))),
        "nan": bool(np.isnan(out).any()),
    }


def failed(e: Exception) -> str:
    """What a measurement that failed records instead of its figure."""
    return f"error: {type(e).__name__}: {str(e)[:300]}"


def check_ring(interpret: bool, quick: bool) -> dict:
    """Kernel vs reference on ragged packed batches, GQA, bf16 and f32, including rows that see no key."""
    out = {}
    cases = [([5, 40, 17], 8, 2, 64), ([130, 3, 300], 12, 4, 128), ([700, 1], 8, 1, 128)]
    cases = [([5, 20], 4, 2, 64)] if quick else cases
    for lengths, h, kvh, d in cases:
        for dtype in (jnp.float32, jnp.bfloat16):
            q, k, v, pos, seg = packed(lengths, h, kvh, d, dtype)
            kseg = seg.at[::3].set(-1)  # some keys belong to no request
            qseg = seg.at[1].set(-1)  # a padding query: sees nothing
            o, lse = ring_attention.block_attention(q, k, v, pos, qseg, pos, kseg, interpret=interpret)
            want = reference.block_attention(q, k, v, pos, qseg, pos, kseg)
            out[f"{lengths}-h{h}-kv{kvh}-d{d}-{jnp.dtype(dtype).name}"] = compare(o, lse, *want)
    return out


def decode_case(batch, context, heads, kv_heads, dim, dtype, page_size=16, seed=0, ragged=True):
    """A one-layer pool holding `batch` requests of up to `context` tokens in shuffled pages."""
    rng = np.random.default_rng(seed)
    pages_per = -(-context // page_size)
    width = -(-pages_per // 4) * 4
    num_pages = batch * pages_per + 1
    kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
    kp = jax.random.normal(kk, (1, kv_heads, num_pages * page_size, dim), dtype)
    vp = jax.random.normal(kv, (1, kv_heads, num_pages * page_size, dim), dtype)
    perm = rng.permutation(num_pages)[: batch * pages_per].reshape(batch, pages_per)
    table = np.zeros((batch, width), np.int32)
    table[:, :pages_per] = perm
    lengths = rng.integers(0, context + 1, batch) if ragged else np.full(batch, context)
    q = jax.random.normal(kq, (batch, heads, dim), dtype)
    return q, kp, vp, jnp.int32(0), jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


def check_decode(interpret: bool, quick: bool) -> dict:
    out = {}
    cases = [(5, 300, 9, 3, 64), (3, 2000, 32, 8, 128), (2, 40, 4, 4, 64)] if not quick else [(3, 50, 4, 2, 64)]
    for b, ctx, h, kvh, d in cases:
        for dtype in (jnp.float32, jnp.bfloat16):
            q, kp, vp, layer, table, lengths = decode_case(b, ctx, h, kvh, d, dtype)
            lengths = lengths.at[0].set(0)
            o, lse = paged_decode.paged_decode_attention(
                q, kp, vp, layer, table, lengths, page_size=16, interpret=interpret
            )
            want = reference.paged_decode_attention(q, kp, vp, layer, table, lengths, page_size=16)
            out[f"b{b}-ctx{ctx}-h{h}-kv{kvh}-d{d}-{jnp.dtype(dtype).name}"] = compare(o, lse, *want)
    return out


def bench_ring(quick: bool) -> dict:
    h, kvh, d, dtype = 32, 8, 128, jnp.bfloat16
    shapes = {"1x8K": [8192], "1x32K": [32768]}
    rng = np.random.default_rng(1)
    shapes["16x512-4K"] = [int(x) for x in rng.integers(512, 4097, 16)]
    tiles = [(64, 64, 4, 2), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
    if quick:
        shapes, tiles, h, kvh = {"1x256": [256]}, [(64, 64, 4, 2)], 4, 2
    results = {}
    for name, lengths in shapes.items():
        q, k, v, pos, seg = packed(lengths, h, kvh, d, dtype)
        flops = causal_flops(lengths, h, d)
        row = {"lengths": lengths if len(lengths) < 20 else len(lengths), "tflops": {}}
        for bq, bk, warps, stages in tiles:
            label = f"pallas_q{bq}_k{bk}_w{warps}_s{stages}"
            try:
                fn = jax.jit(
                    lambda *a, bq=bq, bk=bk, w=warps, s=stages: ring_attention.block_attention(
                        *a, block_q=bq, block_k=bk, num_warps=w, num_stages=s, interpret=quick
                    )
                )
                row["tflops"][label] = flops / timed(fn, q, k, v, pos, seg, pos, seg) / 1e12
            except Exception as e:  # a tile shape the GPU rejects: record it, try the next
                row["tflops"][label] = failed(e)
        try:
            ref = jax.jit(reference.block_attention)
            row["tflops"]["xla_reference"] = flops / timed(ref, q, k, v, pos, seg, pos, seg, iters=1, repeats=1) / 1e12
        except Exception as e:
            row["tflops"]["xla_reference"] = failed(e)
        if not quick:
            row["tflops"]["cudnn"] = cudnn_tflops(lengths, h, kvh, d, dtype, flops)
        results[name] = row
    return results


def cudnn_tflops(lengths, h, kvh, d, dtype, flops) -> float | str:
    """cuDNN flash attention on the same requests, padded to a batch (it has no packed layout)."""
    try:
        b, t = len(lengths), max(lengths)
        kq, kk, kv = jax.random.split(jax.random.key(2), 3)
        q = jax.random.normal(kq, (b, t, h, d), dtype)
        k = jax.random.normal(kk, (b, t, kvh, d), dtype)
        v = jax.random.normal(kv, (b, t, kvh, d), dtype)
        lens = jnp.asarray(lengths, jnp.int32)
        kwargs = {} if b == 1 else {"query_seq_lengths": lens, "key_value_seq_lengths": lens}
        fn = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn", **kwargs)
        )
        return flops / timed(fn, q, k, v) / 1e12
    except Exception as e:
        return failed(e)


def bench_decode(quick: bool, peak: float | None) -> dict:
    h, kvh, d, dtype = 32, 8, 128, jnp.bfloat16
    max_tokens = 4 << 20  # the pool: batch x context at most this (16 GiB of one layer's K and V)
    grid = [(b, c) for b in (1, 16, 64, 256) for c in (1024, 8192, 32768, 131072) if b * c <= max_tokens]
    blocks = [32, 64, 128]
    if quick:
        grid, blocks, h, kvh = [(2, 256)], [64], 4, 2
    results = {}
    for b, c in grid:
        q, kp, vp, layer, table, lengths = decode_case(b, c, h, kvh, d, dtype, ragged=False)
        kv_bytes = 2 * b * c * kvh * d * jnp.dtype(dtype).itemsize
        row = {"batch": b, "context": c, "kv_bytes": kv_bytes, "gbps": {}}
        for bk in blocks:
            try:
                fn = jax.jit(
                    lambda *a, bk=bk: paged_decode.paged_decode_attention(*a, page_size=16, block_k=bk, interpret=quick)
                )
                row["gbps"][f"pallas_k{bk}"] = kv_bytes / timed(fn, q, kp, vp, layer, table, lengths) / 1e9
            except Exception as e:
                row["gbps"][f"pallas_k{bk}"] = failed(e)
        try:
            ref = jax.jit(lambda *a: reference.paged_decode_attention(*a, page_size=16))
            row["gbps"]["xla_reference"] = kv_bytes / timed(ref, q, kp, vp, layer, table, lengths, iters=2) / 1e9
        except Exception as e:
            row["gbps"]["xla_reference"] = failed(e)
        best = max((x for k, x in row["gbps"].items() if k.startswith("pallas") and isinstance(x, float)), default=0)
        if peak:
            row["best_pallas_share_of_peak"] = best * 1e9 / peak
        results[f"{b}x{c}"] = row
        del kp, vp
    return results


def exact(check, *args):
    """Run a check with full-precision float32 matmuls (XLA's default on GPU is TF32, the reference's too)."""
    with jax.default_matmul_precision("highest"):
        return check(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_kernels.json"))
    ap.add_argument("--sections", default="check,ring,decode")
    args = ap.parse_args()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = next((v for k, v in PEAK_HBM.items() if k in kind), None)
    report = {"device": kind, "jax": jax.__version__, "peak_hbm_bytes_per_s": peak}
    interpret = args.quick or dev.platform != "gpu"
    sections = {
        "check_ring": lambda: exact(check_ring, interpret, args.quick),
        "check_decode": lambda: exact(check_decode, interpret, args.quick),
        "ring": lambda: bench_ring(args.quick),
        "decode": lambda: bench_decode(args.quick, peak),
    }
    wanted = args.sections.split(",")
    for name, run in sections.items():
        if not any(name.startswith(w) or name.endswith(w) for w in wanted):
            continue
        t0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-3000:]}
        report[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(report[name], indent=1)[:4000], flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
