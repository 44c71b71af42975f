"""An analytical model of GPU clusters for the simulator: FLOPs, HBM and interconnect bandwidth, efficiencies.

An instance is `tp` GPUs holding one copy of the weights; a group of d instances runs one striped ring
prefill or one multi-master decode step. Times follow from the work and the hardware:

* prefill: linear-layer FLOPs `2 * params * tokens` and causal attention FLOPs `2 * layers * hidden * l^2`,
  split over d * tp GPUs at `prefill_efficiency` of peak; tensor-parallel all-reduces over the interconnect;
  a fixed launch overhead.
* decode step: every GPU reads its weight shard and its share of the KV at `decode_efficiency` of HBM
  bandwidth (or computes, if that is slower); per-layer collective latencies for tp and for d.
* migration: KV bytes over the interconnect;
* reload from the prefix cache's host tier: KV bytes over each GPU's own PCIe link (its shard of the heads).

`A800` is calibrated so that one GPU gives the paper's single-device points for the 7B model (1K-token
prefill 68.9 ms, batch-1 decode step 13.0 ms); A100 and H100 keep its efficiencies with their own peaks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from loong_jax.scheduling.cost_model import CostModel, decode_features, fit_linear, fit_prefill, prefill_features


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float
    link_bytes_per_s: float  # per GPU, one direction, NVLink
    host_link_bytes_per_s: float  # per GPU, host to device, PCIe (pinned memory, as measured, not the spec)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the cluster model needs of a transformer."""

    name: str
    layers: int
    hidden: int
    kv_dim: int  # num_kv_heads * head_dim
    params: float
    bytes_per_value: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * self.bytes_per_value


# PCIe: Gen4 x16 moves about 25 GB/s host to device from pinned memory (32 GB/s raw), Gen5 x16 about 50.
A800 = GPU("A800-80GB", 312e12, 2.039e12, 80e9, 200e9, 25e9)
A100 = GPU("A100-80GB", 312e12, 2.039e12, 80e9, 300e9, 25e9)
H100 = GPU("H100-80GB", 989e12, 3.35e12, 80e9, 450e9, 50e9)
GPUS = {g.name: g for g in (A800, A100, H100)}

LLAMA2_7B = ModelShape("Llama-2-7B", layers=32, hidden=4096, kv_dim=4096, params=6.74e9)  # LWM-Text-1M too

PREFILL_OVERHEAD_S = 3.0e-3
DECODE_OVERHEAD_S = 2.0e-3
COLLECTIVE_LATENCY_S = 8e-6
MEMORY_FOR_KV = 0.9  # share of GPU memory left for weights plus KV (activations take the rest)


def _calibrate() -> tuple[float, float]:
    """Efficiencies that make one A800 hit the paper's 7B points exactly."""
    m = LLAMA2_7B
    flops_1k = 2 * m.params * 1024 + 2 * m.layers * m.hidden * 1024**2
    prefill_eff = flops_1k / A800.flops / (68.9e-3 - PREFILL_OVERHEAD_S)
    bytes_1 = m.params * m.bytes_per_value + m.kv_bytes_per_token * 1
    decode_eff = bytes_1 / A800.hbm_bytes_per_s / (13.0e-3 - DECODE_OVERHEAD_S - 2 * m.layers * COLLECTIVE_LATENCY_S)
    return prefill_eff, decode_eff


PREFILL_EFFICIENCY, DECODE_EFFICIENCY = _calibrate()


@dataclasses.dataclass(frozen=True)
class ClusterModel:
    """num_instances instances of tp GPUs each; times in seconds."""

    gpu: GPU
    model: ModelShape
    num_instances: int
    tp: int

    @property
    def kv_tokens_per_instance(self) -> int:
        usable = self.gpu.memory_bytes * MEMORY_FOR_KV * self.tp - self.model.params * self.model.bytes_per_value
        return int(usable // self.model.kv_bytes_per_token)

    def _allreduce_time(self, tokens: float) -> float:
        """Two all-reduces per layer of the activations of `tokens` tokens within an instance."""
        if self.tp == 1:
            return 0.0
        m = self.model
        size = tokens * m.hidden * m.bytes_per_value * 2 * (self.tp - 1) / self.tp
        return 2 * m.layers * (size / self.gpu.link_bytes_per_s + COLLECTIVE_LATENCY_S)

    def prefill_time(self, degree: int, lengths: Sequence[int]) -> float:
        m, gpus = self.model, degree * self.tp
        tokens = float(sum(lengths))
        flops = 2 * m.params * tokens + 2 * m.layers * m.hidden * float(sum(n * n for n in lengths))
        ring = 0.0 if degree == 1 else m.layers * (degree - 1) * COLLECTIVE_LATENCY_S
        compute = flops / (gpus * self.gpu.flops * PREFILL_EFFICIENCY)
        return PREFILL_OVERHEAD_S + compute + self._allreduce_time(tokens / degree) + ring

    def decode_time(self, degree: int, batch: int, context: int) -> float:
        m, gpus = self.model, degree * self.tp
        weight_bytes = m.params * m.bytes_per_value / self.tp
        kv_bytes = context * m.kv_bytes_per_token / gpus
        read = (weight_bytes + kv_bytes) / (self.gpu.hbm_bytes_per_s * DECODE_EFFICIENCY)
        compute = 2 * m.params * batch / (gpus * self.gpu.flops * PREFILL_EFFICIENCY)
        exchange = 0.0 if degree == 1 else 3 * m.layers * COLLECTIVE_LATENCY_S
        latency = 2 * m.layers * COLLECTIVE_LATENCY_S
        return DECODE_OVERHEAD_S + max(read, compute) + self._allreduce_time(batch / degree) + exchange + latency

    def migrate_time(self, tokens: int) -> float:
        return 2 * COLLECTIVE_LATENCY_S + tokens * self.model.kv_bytes_per_token / (self.gpu.link_bytes_per_s * self.tp)

    def reload_time(self, tokens: int) -> float:
        return 2 * COLLECTIVE_LATENCY_S + tokens * self.model.kv_bytes_per_token / (
            self.gpu.host_link_bytes_per_s * self.tp
        )

    def fitted_cost_model(self, degrees: Sequence[int] | None = None) -> CostModel:
        """The scheduler's cost model, fitted on a grid of this model's times (as profiling would)."""
        degrees = degrees or [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= self.num_instances]
        batches = [[n] * k for n in (256, 1024, 4096, 16384, 65536, 200_000) for k in (1, 2, 4)]
        held = [(n, h) for n in (256, 4096, 32768) for h in (1024, 16384, 131072)]  # n new after h held
        points = [(b, b * c) for b in (1, 4, 16, 64) for c in (512, 4096, 32768)]
        prefill, decode = {}, {}
        for d in degrees:
            t = [self.prefill_time(d, b) for b in batches]
            t += [
                self.prefill_time(d, [0]) + self.prefill_time(d, [h + n]) - self.prefill_time(d, [h]) for n, h in held
            ]
            lengths, cached = batches + [[n] for n, _ in held], [()] * len(batches) + [[h] for _, h in held]
            feats = prefill_features(lengths, cached=cached)
            prefill[d] = fit_prefill(feats, np.array(t))
            t = np.array([self.decode_time(d, b, c) for b, c in points])
            decode[d] = fit_linear(decode_features(points), t)
        per_token = self.migrate_time(1001) - self.migrate_time(1)
        key = f"{self.model.name}/{self.num_instances}x{self.gpu.name}-tp{self.tp}"
        reload = self.reload_time(1001) - self.reload_time(1)
        return CostModel(
            key,
            prefill,
            decode,
            self.migrate_time(0),
            1000 / per_token,
            reload_latency=self.reload_time(0),
            reload_tokens_per_s=1000 / reload,
        )
