"""The smallest per-device memory budget any plan of the space fits in (for the infeasible-budget error).

requires: a SearchEngine whose settings and cost tables can be built.
ensures:  the returned byte count is exact: min over settings, embeddings and divisions of the largest
          stage's memory, where each stage takes its least-memory strategy per layer (memory does not
          depend on redistribution, so layers are independent) for every cap on transient memory.
"""

from __future__ import annotations

import numpy as np


def smallest_budget(engine) -> tuple[int, tuple] | None:
    """(bytes, (pp, global batch, chunks, pipeline)) of the least-memory plan, or None if no plan exists."""
    best = None
    L = len(engine.types)
    for setting in engine.settings():
        pp, in_flight = setting.pp, setting.in_flight
        table = engine.tables[engine.table_key(setting)]
        caps = np.unique(np.concatenate([table.peak[t][table.allowed[t]] for t in engine.types]))
        for embedding in engine.space.embedding_strategies(setting.devices, setting.dp_mode):
            parts = engine.parts(setting, embedding)
            # stage_mem[s][a, b]: least memory of stage s over layers [a, b)
            stage_mem = np.full((pp, L + 1, L + 1), np.inf)
            for s in range(pp):
                for cap in caps:
                    per_layer = np.array([_least(table, t, in_flight[s], cap) for t in engine.types])
                    prefix = np.concatenate([[0.0], np.cumsum(per_layer)])
                    extra = parts[s].memory(in_flight[s]) + max(int(cap), parts[s].peak_bytes)
                    span = prefix[None, :] - prefix[:, None] + extra
                    span[np.tril_indices(L + 1)] = np.inf
                    stage_mem[s] = np.minimum(stage_mem[s], span)
            # min over divisions of max stage memory: dynamic programme over stage ends
            reach = stage_mem[0, 0, :].copy()
            for s in range(1, pp):
                reach = np.min(np.maximum(reach[:, None], stage_mem[s]), axis=0)
            need = reach[L]
            if np.isfinite(need) and (best is None or need < best[0]):
                best = (int(need), (pp, setting.global_batch, setting.chunks, setting.pipeline))
    return best


def _least(table, layer_type: str, in_flight, cap: int) -> float:
    ok = table.allowed[layer_type] & (table.peak[layer_type] <= cap)
    if not ok.any():
        return np.inf
    return float(table.memory(layer_type, in_flight)[ok].min())
