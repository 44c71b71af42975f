"""The Pallas kernels (interpret mode) against the XLA reference, the model run with them, and the engine's
real programs lowered for CUDA on this CPU host (catches GPU-only errors: tile shapes, dtypes, ops).

Tolerances: float32 within 1e-5; bfloat16 within 2e-3 plus one rounding step of a bfloat16 output (both
sides round their output to bfloat16) for 99.9% of the outputs and twice that for all: the kernels round the
probabilities to bfloat16 for the PV matmul as FlashAttention does, the reference keeps float32. Rows that
see no key are -inf in both, with output 0.
"""

from __future__ import annotations

import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from esp_helpers import greedy_params, tiny_esp_engine
from helpers import held_case
from jax.extend import core as jax_core
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, use_abstract_mesh

from loong_jax.model.sampling import VARIANTS
from loong_jax.runtime.packing import run_packed, run_packed_decode
from loong_jax.runtime.work import DecodeWork, Iteration, PrefillWork
from pallas_kernels import attention_backend, paged_decode, reference, ring_attention


def assert_close(out, lse, ref_out, ref_lse, dtype):
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    assert (out[~fin] == 0).all()
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    else:  # the kernels round probabilities to bfloat16 for the PV matmul (as FlashAttention does)
        allowed = 2e-3 + 2**-7 * np.abs(ref_out)
        diff = np.abs(out - ref_out)
        assert (diff <= allowed).mean() >= 0.999 and (diff <= 2 * allowed).all(), float(diff.max())


def striped_batch(lengths, degree, heads, kv_heads, dim, dtype, seed):
    """Each rank's stripe of a packed batch (every degree-th token of every request), padded alike."""
    rng = np.random.default_rng(seed)
    ranks = []
    for r in range(degree):
        pos = np.concatenate([np.arange(r, n, degree) for n in lengths]).astype(np.int32)
        seg = np.concatenate([np.full(len(range(r, n, degree)), i) for i, n in enumerate(lengths)]).astype(np.int32)
        ranks.append((pos, seg))
    t = max(len(p) for p, _ in ranks) + 3  # some padding on every rank
    out = []
    for pos, seg in ranks:
        pad = t - len(pos)
        pos, seg = np.pad(pos, (0, pad)), np.pad(seg, (0, pad), constant_values=-1)
        q = jnp.asarray(rng.standard_normal((t, heads, dim)), dtype)
        k = jnp.asarray(rng.standard_normal((t, kv_heads, dim)), dtype)
        v = jnp.asarray(rng.standard_normal((t, kv_heads, dim)), dtype)
        out.append((q, k, v, jnp.asarray(pos), jnp.asarray(seg)))
    return out


@pytest.mark.parametrize(
    "degree,group,dim,dtype",
    [(1, 1, 64, jnp.float32), (2, 3, 128, jnp.bfloat16), (4, 4, 64, jnp.bfloat16), (8, 8, 16, jnp.float32)],
)
def test_ring_kernel_matches_the_reference_for_every_rank_pair(degree, group, dim, dtype):
    kv_heads = 2 if group < 8 else 1
    ranks = striped_batch([1, 9, 40, 75], degree, group * kv_heads, kv_heads, dim, dtype, seed=degree)
    for qr in range(degree):
        q, _, _, qpos, qseg = ranks[qr]
        for kr in range(degree):
            _, k, v, kpos, kseg = ranks[kr]
            got = ring_attention.block_attention(
                q, k, v, qpos, qseg, kpos, kseg, block_q=16, block_k=16, interpret=True
            )
            want = reference.block_attention(q, k, v, qpos, qseg, kpos, kseg)
            assert_close(*got, *want, dtype)


def test_ring_kernel_long_prompt_skips_tiles_and_masks_only_edges():
    # one 300-token request and a 20-token one: whole tiles, edge tiles and skipped tiles all occur
    lengths = [300, 20]
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]).astype(np.int32)
    seg[[7, 8]] = -1  # padding inside: those rows see nothing
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((320, h, 32)), jnp.float32) for h in (4, 2, 2))
    got = ring_attention.block_attention(q, k, v, pos, seg, pos, seg, block_q=32, block_k=16, interpret=True)
    want = reference.block_attention(q, k, v, pos, seg, pos, seg, block_q=64, block_k=64)
    assert_close(*got, *want, jnp.float32)
    assert np.isneginf(np.asarray(got[1])[[7, 8]]).all()


def test_ring_kernel_rows_with_no_visible_key_are_zero_and_minus_infinity():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((16, 2, 16)), jnp.float32) for _ in range(3))
    qpos, kpos = jnp.arange(16, dtype=jnp.int32), jnp.arange(16, dtype=jnp.int32) + 100  # keys all later
    seg = jnp.zeros(16, jnp.int32)
    out, lse = ring_attention.block_attention(q, k, v, qpos, seg, kpos, seg, interpret=True)
    assert np.isneginf(np.asarray(lse)).all() and (np.asarray(out) == 0).all()


@pytest.mark.parametrize(
    "group,dim,dtype,shared",
    [
        (1, 64, jnp.float32, False),
        (3, 64, jnp.bfloat16, True),
        (4, 128, jnp.float32, True),
        (8, 16, jnp.bfloat16, False),
    ],
)
def test_decode_kernel_matches_the_reference(group, dim, dtype, shared):
    rng = np.random.default_rng(group)
    kv_heads, page_size, layers, num_pages, width = 2, 4, 3, 64, 24
    k_pool = jnp.asarray(rng.standard_normal((layers, kv_heads, num_pages * page_size, dim)), dtype)
    v_pool = jnp.asarray(rng.standard_normal((layers, kv_heads, num_pages * page_size, dim)), dtype)
    table = np.stack([rng.permutation(num_pages)[:width] for _ in range(5)]).astype(np.int32)
    if shared:
        table[1] = table[0]  # two requests on the same pages
    lengths = jnp.asarray([0, 37, 96, 1, 70], jnp.int32)  # ragged, one empty
    q = jnp.asarray(rng.standard_normal((5, group * kv_heads, dim)), dtype)
    layer = jnp.int32(2)
    want = reference.paged_decode_attention(q, k_pool, v_pool, layer, jnp.asarray(table), lengths, page_size=page_size)
    for split in (None, 32):  # one split, and the key axis split in pieces of 32 merged afterwards
        got = paged_decode.paged_decode_attention(
            q,
            k_pool,
            v_pool,
            layer,
            jnp.asarray(table),
            lengths,
            page_size=page_size,
            block_k=16,
            split_tokens=split,
            interpret=True,
        )
        assert_close(*got, *want, dtype)
    assert np.isneginf(np.asarray(got[1])[0]).all() and (np.asarray(got[0], np.float32)[0] == 0).all()


@pytest.mark.parametrize("held,dim,dtype", [([40, 0, 300], 16, jnp.float32), ([0, 77, 5], 32, jnp.bfloat16)])
def test_held_kernel_matches_the_reference(held, dim, dtype):
    """The ring kernel reading K/V through pool rows (an appending prefill's held K/V): tiles past the count,
    of padding or of other requests are skipped, the rest match the XLA reference."""
    args, _ = held_case(np.random.default_rng(dim), held, [9, 20, 30], layers=3, dim=dim)
    q, q_seg, k_pool, v_pool, slots, k_seg, count = args
    q, k_pool, v_pool = (jnp.asarray(x, dtype) for x in (q, k_pool, v_pool))
    layer = jnp.int32(1)
    want = reference.held_attention(q, q_seg, k_pool, v_pool, layer, slots, k_seg, count)
    got = ring_attention.held_attention(
        q, q_seg, k_pool, v_pool, layer, slots, k_seg, count, block_q=16, block_k=32, interpret=True
    )
    assert_close(*got, *want, dtype)


def test_backend_choice():
    assert attention_backend("auto", "cpu").name == "xla"
    assert attention_backend("auto", "gpu").name == "pallas"
    assert attention_backend("pallas", "cpu").name == "pallas (interpret)"
    with pytest.raises(ValueError, match="attention_backend must be one of auto, xla, pallas"):
        attention_backend("cudnn")


def _run(backend: str) -> list:
    """Prefills of degree 1, 2 and 4 with KV scattered by the plans, then multi-master decode steps."""
    engine = tiny_esp_engine(num_instances=4, kv_tokens=256, limits={"attention_backend": backend})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (9, 30, 21, 44)]
    reqs = [engine.add_request(p, greedy_params(6, logprobs=0)) for p in prompts]
    launches = [((0,), [reqs[0]], [[0] * 9]), ((1, 2), [reqs[1]], [[0] * 20 + [1] * 10])]
    launches.append(((0, 1, 2, 3), reqs[2:], [rng.integers(0, 4, 21), [3] * 30 + [0] * 14]))
    for group, rs, plans in launches:
        engine.execute(Iteration(prefills=[PrefillWork(group, rs, [np.asarray(p, np.int32) for p in plans])]))
    for _ in range(5):  # masters on three instances, KV spread over all four
        live = [r for r in reqs if not r.finished]
        engine.execute(Iteration(decodes=[DecodeWork((0, 1, 2, 3), live, [i % 3 for i in range(len(live))])]))
    return [(r.output_ids, r.logprobs) for r in reqs]


def test_model_with_pallas_kernels_matches_xla():
    for (ids, lps), (ref_ids, ref_lps) in zip(_run("pallas"), _run("xla")):
        assert ids == ref_ids
        np.testing.assert_allclose(lps, ref_lps, atol=1e-4)


GPUS = {"A100": "NVIDIA A100-SXM4-80GB", "H100": "NVIDIA H100 80GB HBM3"}  # sm80 and sm90


def _on_abstract_gpu(fn: functools.partial, args, device_kind: str):
    """The program with its group mesh swapped for an abstract mesh of that GPU kind (no GPU here), its
    arguments as bare shapes, and that mesh. jax 0.11's Triton lowering needs the device kind."""
    inner = fn.args[0] if fn.func in (run_packed, run_packed_decode) else fn  # the program inside its unpacking
    mesh = next(a for a in inner.args if isinstance(a, Mesh))
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    gpu_mesh = AbstractMesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types, abstract_device=device)
    swapped = functools.partial(inner.func, *[gpu_mesh if a is mesh else a for a in inner.args], **inner.keywords)
    if inner is not fn:
        swapped = functools.partial(fn.func, swapped, *fn.args[1:])
    return swapped, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args), gpu_mesh


def lower_for_gpu(fn: functools.partial, args, donate, device_kind: str) -> str:
    """The program's CUDA module for an abstract GPU of that kind."""
    fn, args, gpu_mesh = _on_abstract_gpu(fn, args, device_kind)
    with use_abstract_mesh(gpu_mesh):
        return jax.jit(fn, donate_argnums=donate).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _primitives(jaxpr, found: Counter) -> Counter:
    """Primitives of a jaxpr and of the jaxprs inside it, not looking inside Pallas kernels."""
    for eqn in jaxpr.eqns:
        found[eqn.primitive.name] += 1
        if eqn.primitive.name != "pallas_call":
            for sub in jax_core.jaxprs_in_params(eqn.params):
                _primitives(sub, found)
    return found


def test_programs_never_wait_for_the_host_on_gpu():
    """A GPU runs a `cond` by copying its predicate to the host and waiting, and a `while` loop by reading
    its condition every trip; the decode programs (a burst of steps) and the prefill programs (whole, and
    appending to held K/V), in every sampler variant, as a GPU runs them have neither: only loops of static
    length (scans) outside the kernels."""
    engine = tiny_esp_engine(num_instances=2, kv_tokens=256, limits={"max_model_len": 256, "unroll_layers": True})
    ex = engine.executor
    ex.attention = attention_backend("pallas", "gpu")
    for kind, size, rows in (("decode", 4, 4), ("prefill", 32, 2), ("append", 32, 2)):
        for flags in VARIANTS:
            _, fn, args, _ = ex._program_args(kind, (0, 1), size, rows, flags, ex.page_size)
            fn, args, gpu_mesh = _on_abstract_gpu(fn, args, GPUS["H100"])
            with use_abstract_mesh(gpu_mesh):
                found = _primitives(jax.jit(fn).trace(*args).jaxpr.jaxpr, Counter())
            assert found["cond"] == found["while"] == 0 and found["pallas_call"], (kind, flags, found)
            assert kind != "decode" or found["scan"] >= 1  # the burst's steps
            # the appending prefill runs one held-attention kernel per layer besides the ring's
            kernels = found["pallas_call"]
            assert kind == "decode" or kernels == engine.cfg.num_layers * (2 + (kind == "append")), (kind, kernels)


@pytest.mark.parametrize("instances,tp,gpu", [(1, 1, "A100"), (4, 1, "H100"), (4, 1, "A100"), (2, 2, "H100")])
def test_real_programs_lower_for_cuda_with_the_triton_kernels(instances, tp, gpu):
    engine = tiny_esp_engine(num_instances=instances, tp=tp, kv_tokens=1024, limits={"unroll_layers": True})
    ex = engine.executor
    ex.attention = attention_backend("pallas", "gpu")  # the kernels and layers as on a GPU: no interpret mode
    group = tuple(range(min(instances, 4)))
    for kind, size, rows in (("append", 32, 2), ("decode", 4, 4), ("migrate", 16, 0)):
        if kind == "migrate" and len(group) < 2:
            continue
        g = group[:2] if kind == "migrate" else group
        # ("append": the prefill program with its appending path, K/V held before attended where it lies)
        _, fn, args, donate = ex._program_args(kind, g, size, rows, VARIANTS[-1], ex.page_size)
        text = lower_for_gpu(fn, args, donate, GPUS[gpu])
        if kind != "migrate":
            assert "__gpu$xla.gpu.triton" in text, f"{kind}: no Triton kernel in the CUDA module"
