"""A group program's sampled rows split by rank and put back together: each process reads the ranks of its
own devices, and the leader joins every process's into the [d, rows] outputs the engine applies."""

from __future__ import annotations

from typing import Any

import numpy as np

from loong_jax.model.sampling import SamplerOutputs


def local_rows(outputs: Any) -> dict[int, list[np.ndarray]]:
    """Rank -> that rank's rows of each output field, for the ranks whose devices are this process's
    (the outputs are [d, rows, ...] arrays, sharded on their leading axis or replicated; tp devices of a
    rank agree)."""
    rows: dict[int, list[np.ndarray]] = {}
    for field, x in enumerate(outputs):
        for shard in x.addressable_shards:  # a shard may hold several ranks (XLA replicates empty outputs)
            start, stop, _ = shard.index[0].indices(x.shape[0])
            data = np.asarray(shard.data)
            for rank in range(start, stop):
                rows.setdefault(rank, [None] * len(outputs))[field] = data[rank - start]
    return {rank: fields for rank, fields in rows.items() if all(f is not None for f in fields)}


def join_rows(rows: dict[int, list[np.ndarray]], ranks: int) -> SamplerOutputs:
    """The [d, rows, ...] outputs of a group of `ranks` ranks from every rank's rows."""
    missing = sorted(set(range(ranks)) - set(rows))
    if missing:
        raise RuntimeError(f"no process returned the rows of ranks {missing}")
    fields = []
    for f, name in enumerate(SamplerOutputs._fields):
        parts = [rows[r][f] for r in range(ranks)]
        if len({p.shape for p in parts}) > 1:
            raise RuntimeError(f"the ranks' rows of {name} differ in shape: {[p.shape for p in parts]}")
        fields.append(np.stack(parts))
    return SamplerOutputs(*fields)
