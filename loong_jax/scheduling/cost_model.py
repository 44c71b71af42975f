"""The scheduler's cost model: predicted prefill, decode-step and migration times, fitted from measurements.

Per degree of parallelism d (instances in the group):
* prefill of a batch with lengths l: `a + b * sum(l) + c * sum(l^2)` (linear layers, then causal attention);
  a prompt whose first h tokens' K/V is already held (a cached prefix, earlier chunks) computes its n new
  tokens: `b * n + c * n^2 + e * n * h` (the ring over the new tokens, then their attention to the held K/V,
  which runs where that K/V lies; e = 2c if both ran alike, as the causal attention over n + h tokens less
  the one over h). A profiled executor runs padded shapes: there n * h is every computed (bucketed) query
  against every block of `held_block` keys a rank attends, i.e. ceil(h / (d * held_block)) blocks;
* one decode step: `a + b * batch + c * context` (weights and per-step overhead, per-request work, KV read);
* migration of n tokens: `latency + n / tokens_per_s`;
* reload of n tokens' K/V from the host tier of the prefix cache into a pool: `latency + n / tokens_per_s`.
Coefficients are fitted by least squares on relative error, saved as JSON keyed by model and hardware.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class CostModel:
    """Fitted coefficients per degree; degrees not profiled are scaled from the nearest profiled one."""

    key: str  # model and hardware the coefficients belong to
    prefill: dict[int, tuple[float, ...]]  # degree -> (a, b, c, e)
    decode: dict[int, tuple[float, float, float]]  # degree -> (a, b, c)
    migrate_latency: float = 0.0
    migrate_tokens_per_s: float = math.inf
    prefill_bucket: int = 0  # > 0: each rank's tokens are padded to a power-of-two bucket of at least this
    held_block: int = 0  # > 0: each rank attends the K/V it holds in blocks of this many keys (padded)
    reload_latency: float = 0.0
    reload_tokens_per_s: float = math.inf

    def prefill_tokens(self, degree: int, total: float | np.ndarray) -> float | np.ndarray:
        """Tokens a prefill of `total` tokens really computes at this degree (after shape padding)."""
        if not self.prefill_bucket:
            return total
        per_rank = np.maximum(np.ceil(np.asarray(total, np.float64) / degree), self.prefill_bucket)
        return degree * 2.0 ** np.ceil(np.log2(per_rank))

    def prefill_terms(self, degree: int, lengths: Sequence[int], cached: Sequence[int] = ()) -> list[float]:
        """The features the prefill coefficients multiply: [1, tokens, sum of n^2, sum of n * h] for prompts
        of n new tokens after h tokens whose K/V is held (`cached`; none by default)."""
        cached = list(cached) or [0] * len(lengths)
        tokens = float(self.prefill_tokens(degree, sum(lengths)))
        held = float(self.held_pairs(degree, tokens, sum(cached), sum(n * h for n, h in zip(lengths, cached))))
        return [1.0, tokens, float(sum(n * n for n in lengths)), held]

    def held_pairs(self, degree: int, tokens: float | np.ndarray, held: float | np.ndarray, pairs: float | np.ndarray):
        """The held-K/V feature of a batch computing `tokens` (after padding) whose requests hold `held` tokens'
        K/V in all (`pairs`: the sum of n * h): `pairs`, or with padded blocks, every computed query against
        every block a rank attends (the held K/V spread evenly over the ranks)."""
        if not self.held_block:
            return pairs
        blocks = np.ceil(np.asarray(held, np.float64) / (degree * self.held_block))
        return np.asarray(tokens, np.float64) * self.held_block * blocks

    def coefficients(self, table: dict[int, tuple[float, ...]], degree: int) -> tuple[float, ...]:
        if degree in table:
            return table[degree]
        near = min(table, key=lambda d: (abs(math.log2(d / degree)), d))
        a, *per_token = table[near]
        return a, *(x * near / degree for x in per_token)  # work per token spreads over the group

    def prefill_time(self, degree: int, lengths: Sequence[int], cached: Sequence[int] = ()) -> float:
        a, b, c, e = self.coefficients(self.prefill, degree)
        _, s1, s2, s3 = self.prefill_terms(degree, lengths, cached)
        return a + b * s1 + c * s2 + e * s3

    def decode_time(self, degree: int, batch: int, context: int) -> float:
        a, b, c = self.coefficients(self.decode, degree)
        return a + b * batch + c * context

    def migrate_time(self, tokens: int) -> float:
        return self.migrate_latency + tokens / self.migrate_tokens_per_s

    def reload_time(self, tokens: int) -> float:
        return self.reload_latency + tokens / self.reload_tokens_per_s

    def reload_pays(self, degree: int, new: int, held: int, reload: int) -> bool:
        """Whether loading `reload` tokens' K/V from host memory is predicted faster than computing them, for
        a prompt of `new` tokens after `held` ones (the reloaded ones among the new) prefilled at `degree`."""
        computed = self.prefill_time(degree, [new], [held]) - self.prefill_time(degree, [new - reload], [held + reload])
        return self.reload_time(reload) < computed

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "prefill": {str(d): list(v) for d, v in self.prefill.items()},
            "decode": {str(d): list(v) for d, v in self.decode.items()},
            "migrate_latency": self.migrate_latency,
            "migrate_tokens_per_s": self.migrate_tokens_per_s if math.isfinite(self.migrate_tokens_per_s) else None,
            "prefill_bucket": self.prefill_bucket,
            "held_block": self.held_block,
            "reload_latency": self.reload_latency,
            "reload_tokens_per_s": self.reload_tokens_per_s if math.isfinite(self.reload_tokens_per_s) else None,
        }

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        rate, reload = data.get("migrate_tokens_per_s"), data.get("reload_tokens_per_s")
        return cls(
            data["key"],
            {int(d): _with_held_term(v) for d, v in data["prefill"].items()},
            {int(d): tuple(v) for d, v in data["decode"].items()},
            float(data.get("migrate_latency", 0.0)),
            math.inf if rate is None else float(rate),
            int(data.get("prefill_bucket", 0)),
            int(data.get("held_block", 0)),
            float(data.get("reload_latency", 0.0)),
            math.inf if reload is None else float(reload),
        )

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(json.loads(Path(path).read_text()))


def _with_held_term(coefficients: Sequence[float]) -> tuple[float, ...]:
    """Prefill coefficients (a, b, c, e); a profile fitted before the held-K/V term gets e = 2c."""
    a, b, c, *e = (float(x) for x in coefficients)
    return a, b, c, e[0] if e else 2 * c


def fit_linear(features: np.ndarray, times: np.ndarray) -> tuple[float, ...]:
    """Non-negative coefficients x minimising the relative error |features @ x - times| / times."""
    w = 1.0 / np.maximum(times, 1e-12)
    a = features * w[:, None]
    y = times * w
    active = list(range(features.shape[1]))
    while True:  # drop coefficients that come out negative and refit the rest
        x = np.zeros(features.shape[1])
        if active:
            x[active] = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
        neg = [i for i in active if x[i] < 0]
        if not neg:
            return tuple(float(v) for v in x)
        active.remove(min(neg, key=lambda i: x[i]))


def prefill_features(
    batches: Sequence[Sequence[int]],
    degree: int = 1,
    bucket: int = 0,
    cached: Sequence[Sequence[int]] | None = None,
    held_block: int = 0,
) -> np.ndarray:
    """Feature rows [1, tokens computed, sum of n^2, held-K/V pairs] of prefill batches of new tokens n after
    h held ones (`cached`, per batch; none by default; see CostModel.prefill_terms)."""
    shape = CostModel("features", {}, {}, prefill_bucket=bucket, held_block=held_block)
    cached = cached or [()] * len(batches)
    return np.array([shape.prefill_terms(degree, b, h) for b, h in zip(batches, cached)], np.float64)


def fit_prefill(features: np.ndarray, times: np.ndarray) -> tuple[float, ...]:
    """Prefill coefficients (a, b, c, e) fitted on feature rows; without points holding K/V, e = 2c."""
    if not features[:, 3].any():
        return _with_held_term(fit_linear(features[:, :3], times))
    return fit_linear(features, times)


def decode_features(points: Sequence[tuple[int, int]]) -> np.ndarray:
    """points: (batch size, total context tokens)."""
    return np.array([[1.0, b, c] for b, c in points], np.float64)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    return np.abs(p - m) / m


def rough_cost_model(key: str = "uncalibrated") -> CostModel:
    """A stand-in until `loong profile` has run: prefill work spread over the group, decode cost per request
    and per context token. Only the relative sizes matter to most decisions."""
    prefill = {1: (5e-3, 1e-3, 1e-8, 2e-8)}
    decode = {1: (2e-2, 3e-3, 1e-5)}
    return CostModel(key, prefill, decode, 1e-3, 1e6, reload_latency=1e-3, reload_tokens_per_s=1e6)
