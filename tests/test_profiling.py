"""`loong profile` on a tiny model: every kind of pass is measured, the cost model is fitted with its held-K/V
term from passes appending to a cached prefix and its reload term from loads out of the host tier, and its
held-out errors are reported."""

from __future__ import annotations

import math

from esp_helpers import tiny_esp_engine

from loong_jax.profiling import profile
from loong_jax.scheduling.cost_model import CostModel


def test_profile_fits_whole_and_appending_prefills_decodes_and_migrations(tmp_path):
    limits = dict(max_model_len=512, max_num_seqs=4, max_prefill_tokens=128)
    engine = tiny_esp_engine(num_instances=2, kv_tokens=1024, page_size=8, limits=limits)
    report = profile(engine, repeats=1, show=False)
    cost = report.cost
    assert sorted(cost.prefill) == sorted(cost.decode) == [1, 2]
    for d in (1, 2):
        assert len(cost.prefill[d]) == 4 and all(x >= 0 for x in cost.prefill[d])
        assert len(report.points["appending"][d]) >= 2
        assert all(p["held"] > 0 and p["seconds"] > 0 for p in report.points["appending"][d])
    assert all(math.isfinite(e) for e in (report.prefill_error, report.appending_error, report.decode_error))
    assert cost.migrate_tokens_per_s > 0 and len(report.points["migrate"]) >= 2
    assert math.isfinite(cost.reload_tokens_per_s) and len(report.points["reload"]) == 3  # host tier loads
    assert engine.kv_used_tokens == 0
    cost.save(tmp_path / "p.json")
    assert CostModel.load(tmp_path / "p.json") == cost
