"""Every step reads each layer's weights where they lie: nothing in the real decode and prefill programs copies a
weight matrix or a KV pool. On CPU the optimised HLO is inspected; for CUDA (no GPU here, so no CUDA compiler)
the program as lowered for an abstract H100 is, where every layer weight must go straight into a matmul.

A tiny model with dimensions no activation shares, so that any array shaped like a weight matrix is a copy of
one: a scan over stacked weights slices (copies) every layer's matrices at every step, and the checks find it.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import numpy as np
import pytest
from esp_helpers import tiny_esp_engine
from jax.extend import core as jax_core
from jax.sharding import use_abstract_mesh
from test_pallas_kernels import GPUS, _on_abstract_gpu

from loong_jax import SamplingParams
from loong_jax.model.llama import param_shapes
from loong_jax.model.sampling import VARIANTS
from pallas_kernels import attention_backend

DIMS = dict(hidden_size=40, intermediate_size=88, num_heads=3, num_kv_heads=1, head_dim=16, num_layers=3)
# (kind, rows or tokens per rank, steps or rows); "append": the prefill with its part attending to held K/V
PROGRAMS = (("decode", 1, 4), ("decode", 4, 4), ("append", 32, 2))
GROUP = (0, 1)  # multi-master decode and a two-rank ring
OP = re.compile(r"^\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(")
NOT_COPIES = {"parameter", "get-tuple-element", "bitcast", "tuple"}


def _engine(unroll: bool, tp: int = 1):
    limits = {"max_model_len": 256, "max_num_seqs": 4, "unroll_layers": unroll}
    return tiny_esp_engine(num_instances=2, tp=tp, kv_tokens=512, limits=limits, **DIMS)


def _weight_shapes(cfg) -> set[tuple[int, ...]]:
    """Every layer weight matrix's shape, either way round (a transposed copy is a copy too)."""
    shapes = {s[1:] for name, s in param_shapes(cfg).items() if name.startswith("layers.") and len(s) == 3}
    return shapes | {s[::-1] for s in shapes}


def hlo_copies(text: str, weight_shapes: set[tuple[int, ...]], pool_shape: tuple[int, ...]) -> list[str]:
    """Instructions of an optimised HLO module that materialise an array shaped like a layer's weight matrix
    (unit dimensions aside: a slice of stacked weights is [1, in, out]), or that copy a KV pool."""
    found = []
    for line in text.splitlines():
        m = OP.match(line)
        if not m or m.group(2) in NOT_COPIES:
            continue
        dims = tuple(int(x) for x in m.group(1).split(",") if x)
        if tuple(x for x in dims if x != 1) in weight_shapes or (m.group(2) == "copy" and dims == pool_shape):
            found.append(line.strip()[:160])
    return found


def _cpu_copies(engine, kind: str, size: int, rows: int) -> list[str]:
    ex, cfg = engine.executor, engine.cfg
    _, fn, args, donate = ex._program_args(kind, GROUP, size, rows, VARIANTS[-1])
    text = jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()
    pool = (1, cfg.num_layers, cfg.num_kv_heads, ex.num_slots, cfg.head_dim)
    return hlo_copies(text, _weight_shapes(cfg), pool)


def weight_uses(jaxpr, weights: set, uses: Counter) -> Counter:
    """What consumes the given variables, following them into nested programs (jit, shard_map, the body of a
    scan that takes them as constants: the decode burst's)."""
    for eqn in jaxpr.eqns:
        hits = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jax_core.Literal) and v in weights]
        if not hits:
            continue
        subs = list(jax_core.jaxprs_in_params(eqn.params))
        name = eqn.primitive.name
        passed = name in ("pjit", "jit", "shard_map", "closed_call") or (  # a scan's constants: as they are
            name == "scan" and max(hits) < eqn.params["num_consts"]
        )
        if passed and len(subs) == 1:
            inner = subs[0]
            weight_uses(inner, {inner.invars[i] for i in hits}, uses)
        else:
            uses[eqn.primitive.name] += len(hits)
    return uses


def _cuda_weight_uses(engine, kind: str, size: int, rows: int) -> Counter:
    ex, cfg = engine.executor, engine.cfg
    ex.attention, cpu = attention_backend("pallas", "gpu"), ex.attention
    try:
        _, fn, args, _ = ex._program_args(kind, GROUP, size, rows, VARIANTS[-1], ex.page_size)
        fn, args, gpu_mesh = _on_abstract_gpu(fn, args, GPUS["H100"])
        with use_abstract_mesh(gpu_mesh):
            jaxpr = jax.jit(fn).trace(*args).jaxpr.jaxpr
    finally:
        ex.attention = cpu
    n_params = len(jax.tree.leaves(args[0]))
    layer_ndim = {2} if engine.executor.instances.unstacked else {3}
    weights = {
        v for v in jaxpr.invars[:n_params] if v.aval.ndim in layer_ndim and v.aval.shape[-2:] in _weight_shapes(cfg)
    }
    assert len(weights) >= 7 * (cfg.num_layers if engine.executor.instances.unstacked else 1)
    return weight_uses(jaxpr, weights, Counter())


@pytest.fixture(scope="module")
def unrolled():
    return _engine(unroll=True)


@pytest.mark.parametrize("kind,size,rows", PROGRAMS)
def test_no_program_copies_a_weight_or_a_pool_on_cpu(unrolled, kind, size, rows):
    assert _cpu_copies(unrolled, kind, size, rows) == []


@pytest.mark.parametrize("kind,size,rows", PROGRAMS)
def test_every_weight_goes_straight_into_a_matmul_on_cuda(unrolled, kind, size, rows):
    uses = _cuda_weight_uses(unrolled, kind, size, rows)
    assert set(uses) == {"dot_general"}, uses


def test_the_checks_find_the_copies_of_a_scan_over_stacked_weights():
    """The layers scanned over stacked weights (the option that compiles faster): both checks see the slices."""
    engine = _engine(unroll=False)
    assert any("dynamic-slice" in line for line in _cpu_copies(engine, "decode", 4, 4))
    assert "dot_general" not in _cuda_weight_uses(engine, "decode", 4, 4)


def _serve(engine, prompts):
    reqs = [engine.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return reqs


@pytest.mark.parametrize("tp", [1, 2])
def test_unrolled_layers_give_the_outputs_of_the_scan(unrolled, tp):
    """The same weights, scanned or unrolled, through the scheduler on 2 instances (ring prefills, multi-master
    decode bursts), also with each instance's MLP split over 2 devices (tensor parallel; these 3 heads stay
    whole): the same tokens and log-probabilities."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 40, 17, 90)]
    want = _serve(_engine(unroll=False, tp=tp), prompts)
    got = _serve(unrolled if tp == 1 else _engine(unroll=True, tp=tp), prompts)
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
