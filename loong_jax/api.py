"""The Python API: `LLM(...)`, `generate()` and `chat()`, in the shape users know from other engines."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from loong_jax.engine import EngineConfig, build_engine, warmup_jobs
from loong_jax.model.sampling import SamplingParams
from loong_jax.multihost.channel import PlanChannel
from loong_jax.multihost.follower import Follower
from loong_jax.outputs import RequestOutput
from loong_jax.profiling import DEFAULT_PROFILE_DIR, profile_key, profile_path
from loong_jax.runtime.platform import DEFAULT_CACHE_DIR, enable_compilation_cache, parse_dtype
from loong_jax.scheduling.cost_model import CostModel

log = logging.getLogger("loong_jax")
Prompt = str | Sequence[int]
Message = dict[str, Any]


class LLM:
    """A model loaded onto the engine, ready to generate.

    model: a .gguf file, a Hugging Face directory, an Orbax directory written by `loong convert`, or None
    for the embedded SmolLM2-135M-Instruct. kv_tokens_per_instance: the KV pool of each instance, or None to
    size it from memory_utilization (a fraction of the devices' memory: default 0.9 on accelerators, 0.5 of
    the host's available memory on CPU); a size or model that cannot fit is a ValueError. policy: "elastic"
    (the cost-model scheduler) or "shared" (one program at a time, for instances that share one processor,
    such as virtual CPU devices). output_estimate: the new tokens admission plans for when a request sets no
    max_tokens (it may run longer: a request that then finds no room is recomputed later, nothing is lost).
    decode_steps: the most decode steps per launch (a burst on the device: the host reads, streams and
    schedules once per burst, and dispatches a group's next burst before reading the last; single steps while
    a prompt that could start waits, so that it waits at most for the bursts in flight). max_burst_s: where a
    burst of decode_steps would last longer than this at the decode speed measured, single steps instead.
    max_batch_requests: requests one scheduling decision admits (None: what one prefill pass per instance
    takes); running decodes are paused for them when the time the waiting requests save outweighs the time
    the decodes lose.
    unroll_layers: run the layers one after another, each reading its weights where they lie; False: a loop
    over the stacked weights, which copies every layer's weights at every step but compiles 2-3x faster, with
    half the memory mappings, on CPU. None (default): unrolled on accelerators, a loop on CPU (where unrolling
    makes SmolLM2 decode 1.57x faster).
    host_kv_cache_gib: GiB of host memory for the prefix cache's second tier: pages evicted from the KV pools
    are kept there and loaded back into the pools of whichever instances a later prompt starting the same
    way runs on. None (default): a quarter of the host memory left after the process and the pools (nothing
    is held until pages are evicted); 0: none.
    compiler_options: XLA options for every program, e.g. {"xla_backend_optimization_level": 0} for faster
    compiles of slower code (small models, experiments).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        num_instances: int = 1,
        tp: int = 1,
        max_model_len: int | None = None,
        dtype: str | None = None,
        kv_tokens_per_instance: int | None = None,
        memory_utilization: float | None = None,
        page_size: int = 16,
        max_num_seqs: int = 32,
        max_batch_requests: int | None = None,
        decode_steps: int = 8,
        max_burst_s: float = 0.25,
        max_prefill_tokens: int | None = None,
        output_estimate: int = 256,
        policy: str = "elastic",
        attention_backend: str = "auto",
        enable_prefix_caching: bool = True,
        host_kv_cache_gib: float | None = None,
        unroll_layers: bool | None = None,
        heartbeat_timeout_s: float = 30.0,
        step_timeout_s: float = 300.0,
        seed: int | None = None,
        warmup: bool = False,
        compilation_cache_dir: str | None = DEFAULT_CACHE_DIR,
        profile_dir: str | None = DEFAULT_PROFILE_DIR,
        compiler_options: dict[str, Any] | None = None,
    ):
        from checkpoints import load_checkpoint  # noqa: PLC0415 (checkpoints imports loong_jax.model.config)

        enable_compilation_cache(compilation_cache_dir)
        self.dtype = parse_dtype(dtype)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(model, self.dtype)
        self.config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        limit = self.config.context_limit
        if max_model_len is not None and not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] for this model, got {max_model_len}")
        ecfg = EngineConfig(
            max_model_len=max_model_len or limit,
            num_instances=num_instances,
            tp=tp,
            kv_tokens_per_instance=kv_tokens_per_instance,
            memory_utilization=memory_utilization,
            page_size=page_size,
            max_num_seqs=max_num_seqs,
            max_batch_requests=max_batch_requests,
            decode_steps=decode_steps,
            max_burst_s=max_burst_s,
            max_prefill_tokens=max_prefill_tokens,
            output_estimate=output_estimate,
            policy=policy,
            attention_backend=attention_backend,
            enable_prefix_caching=enable_prefix_caching,
            host_kv_cache_gib=host_kv_cache_gib,
            unroll_layers=unroll_layers,
            heartbeat_timeout_s=heartbeat_timeout_s,
            step_timeout_s=step_timeout_s,
        )
        self.engine = build_engine(
            self.config,
            ckpt.graphdef,
            ckpt.state,
            self.tokenizer,
            ecfg,
            self.dtype,
            seed,
            compiler_options=compiler_options,
        )
        log.info(
            "loaded %s (%s) in %.1fs on %d instance(s) x tp=%d (%s)",
            ckpt.source,
            self.config.name,
            time.perf_counter() - t0,
            num_instances,
            tp,
            self.engine.executor.instances.devices[0][0].platform,
        )
        self.kv_capacity = self.engine.kv_capacity
        log.info("%s", self.kv_capacity.describe())
        self.cost_model_source = "uncalibrated (run `loong profile` to fit one)"
        if policy == "shared":  # schedules without a cost model: no profile to look up
            self.cost_model_source = "none (the shared policy uses none)"
            log.info("policy: shared (one program at a time: the instances share one processor)")
        else:
            path = profile_path(profile_key(self.engine), profile_dir) if profile_dir else None
            if path is not None and path.exists():
                self.use_cost_model(CostModel.load(path))
                self.cost_model_source = str(path)
            log.info("policy: elastic; scheduler cost model: %s", self.cost_model_source)
        if warmup and not self.is_follower:
            self.warmup()

    @property
    def is_follower(self) -> bool:
        """A process of a multi-host run other than process 0: it takes no requests, it runs `follow()`."""
        return jax.process_index() != 0

    def follow(self) -> None:
        """Follower: carry out process 0's operations on this process's instances until it stops."""
        if not self.is_follower:
            raise RuntimeError("process 0 leads a multi-host run; only the other processes follow")
        Follower(self.engine.executor, PlanChannel.from_jax()).run()

    def close(self) -> None:
        """Leader of a multi-host run: release the followers (their `follow()` returns). A no-op otherwise."""
        peers = self.engine.executor.peers
        if peers is not None:
            peers.stop()

    def _check_leader(self) -> None:
        if self.is_follower:
            raise RuntimeError(f"process {jax.process_index()} follows process 0, which takes the requests")

    def use_cost_model(self, cost: CostModel) -> None:
        """Schedule with this cost model from now on (e.g. one `profile()` just fitted); the shared policy
        needs none."""
        self.engine.policy = self.engine.default_policy(cost)

    def warmup(self, show_progress: bool = True) -> int:
        """Compile the programs the engine's policy uses (see `warmup_jobs`); returns how many compiled. In a
        multi-host run the leader's warm-up is every process's (followers warm up when it sends them)."""
        if self.is_follower:
            return 0
        t0 = time.perf_counter()
        n = self.engine.executor.warmup(warmup_jobs(self.engine.ecfg), show_progress)
        log.info("warmed up %d programs in %.1fs", n, time.perf_counter() - t0)
        return n

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer; pass token id lists instead of strings")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate a completion for each prompt (strings or token-id lists), batched continuously."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if sampling_params is not None else SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        self._check_leader()
        encoded = [self._encode(p) for p in prompts]
        reqs = []
        try:
            for ids, p in zip(encoded, plist):
                reqs.append(self.engine.add_request(ids, p))
        except Exception:
            for r in reqs:
                self.engine.abort(r.rid)
            raise
        bar = tqdm(total=len(reqs), desc="generating", disable=not use_tqdm)
        done = 0
        while any(not r.finished for r in reqs):
            self.engine.step()
            now = sum(r.finished for r in reqs)
            bar.update(now - done)
            done = now
        bar.close()
        return [RequestOutput.from_request(r) for r in reqs]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generate one completion and yield its text as it is produced (other requests keep running)."""
        self._check_leader()
        req = self.engine.add_request(self._encode(prompt), sampling_params or SamplingParams())
        try:
            while not req.finished:
                self.engine.step()
                delta = req.take_text_delta()
                if delta:
                    yield delta
            delta = req.take_text_delta()
            if delta:
                yield delta
        finally:
            self.engine.abort(req.rid)

    def chat_prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of one conversation rendered with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so chat is unavailable")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt_ids(c) for c in convs], sampling_params, use_tqdm)
