"""The JAX executor of one instance: its weights, its KV pool on device, and its compiled programs."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from loong_jax.batching import bucket, decode_inputs, prefill_inputs, sampler_inputs
from loong_jax.config import ModelConfig
from loong_jax.kv_pool import empty_cache
from loong_jax.program_cache import ProgramCache, shape_key
from loong_jax.programs import DecodeInputs, PrefillInputs, decode_program, prefill_program
from loong_jax.sampling import SamplerFlags, SamplerInputs, SamplerOutputs
from pallas_kernels.reference import DECODE_PAGES_PER_BLOCK


class JaxExecutor:
    """Runs prefill and decode programs on one device; donates the KV cache so it is updated in place."""

    def __init__(
        self,
        cfg: ModelConfig,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        *,
        num_pages: int,
        page_size: int,
        max_pages_per_request: int,
        dtype: Any,
        device: jax.Device | None = None,
    ):
        self.cfg = cfg
        self.graphdef = graphdef
        self.device = device or jax.devices()[0]
        self.page_size = page_size
        self.num_slots = num_pages * page_size
        self.page_table_width = bucket(max_pages_per_request, DECODE_PAGES_PER_BLOCK)
        self.state = jax.device_put(state, self.device)
        self.cache = jax.device_put(empty_cache(cfg, self.num_slots, dtype), self.device)
        self.programs = ProgramCache()

    def prefill(self, inp: PrefillInputs, samp: SamplerInputs, flags: SamplerFlags) -> SamplerOutputs:
        key = ("prefill", flags, shape_key((inp, samp)))
        fn = functools.partial(prefill_program, self.graphdef, flags)
        return self._run(key, fn, inp, samp)

    def decode(self, inp: DecodeInputs, samp: SamplerInputs, flags: SamplerFlags) -> SamplerOutputs:
        key = ("decode", flags, shape_key((inp, samp)))
        fn = functools.partial(decode_program, self.graphdef, self.page_size, flags)
        return self._run(key, fn, inp, samp)

    def _run(self, key: Any, fn: Any, inp: Any, samp: Any) -> SamplerOutputs:
        args = (self.state, self.cache, inp, samp)
        program = self.programs.get(key, fn, args, donate_argnums=(1,))
        out, self.cache = program(*args)
        return SamplerOutputs(*jax.device_get(tuple(out)))

    def warmup(self, prefill_shapes: Iterable[tuple[int, int]], decode_rows: Iterable[int], show: bool) -> int:
        """Compile the default-sampler programs for the given (tokens, rows) and decode batch buckets."""
        jobs = [("prefill", s) for s in prefill_shapes] + [("decode", b) for b in decode_rows]
        before = self.programs.compiles
        flags = SamplerFlags()
        for kind, shape in tqdm(jobs, desc="warming up programs", disable=not show, unit="program"):
            rows = shape[1] if kind == "prefill" else shape
            samp = sampler_inputs([], rows, flags)
            if kind == "prefill":
                inp = prefill_inputs([], [], self.num_slots, shape[0], rows)
                key = ("prefill", flags, shape_key((inp, samp)))
                fn = functools.partial(prefill_program, self.graphdef, flags)
            else:
                inp = decode_inputs([], [], [], [], [], self.num_slots, rows, self.page_table_width)
                key = ("decode", flags, shape_key((inp, samp)))
                fn = functools.partial(decode_program, self.graphdef, self.page_size, flags)
            self.programs.get(key, fn, (self.state, self.cache, inp, samp), donate_argnums=(1,))
        return self.programs.compiles - before
