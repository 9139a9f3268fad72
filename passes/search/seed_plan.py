"""A good first incumbent for one setting, cheaply: the exact search prunes with the incumbent's time, so the
closer it starts to the optimum, the smaller every front stays.

Plans seeded: even pp_division; in each stage the first ``m`` layers run strategy A and the rest strategy B
(A = B: a uniform stage), for every A, B allowed on all the stage's layers and every m (at most 33 values
of m, evenly spread), vectorised. With a
single memory constraint the relaxed optimum of a run of equal layers mixes at most two strategies, so
this family is usually within a few percent of the optimum. Each stage takes its candidate with the least
c·X + G that fits; the plan is then priced by CostModel.evaluate itself, so a seed is never wrong, only
more or less good.

requires: a StageSolver's table (unfolded) and its p2p terms, the engine's embedding parts.
ensures:  ``seed_plan`` returns a Plan of the setting that fits the budget (with its Prediction), or None.
"""

from __future__ import annotations

import numpy as np

from galvatron_fx.passes.search.front import redistribution_matrix
from galvatron_fx.plan import Plan, even_division


def _stage_candidates(engine, table, a: int, b: int, in_flight, micro_batch: int):
    """Per (A, B, m) flattened: X, G, memory, peak of layers [a, b) with A on [a, a+m) and B on [a+m, b)."""
    types = engine.types[a:b]
    ok = np.logical_and.reduce([table.allowed[t] for t in types]) & np.logical_or.reduce(
        [table.useful[t] for t in types]
    )
    js = np.flatnonzero(ok)
    if len(js) == 0:
        return None
    n = b - a

    def prefix(field, scale=1):
        rows = np.array([field[t][js] * scale for t in types])  # (n, J)
        return np.concatenate([np.zeros((1, len(js)), rows.dtype), np.cumsum(rows, axis=0)])  # (n + 1, J)

    px, pg = prefix(table.x), prefix(table.g)
    pm = prefix({t: table.memory(t, in_flight) for t in types})
    peaks = np.array([table.peak[t][js] for t in types])  # (n, J)
    head_peak = np.concatenate([np.zeros((1, len(js)), np.int64), np.maximum.accumulate(peaks, axis=0)])
    tail_peak = np.concatenate([np.maximum.accumulate(peaks[::-1], axis=0)[::-1], np.zeros((1, len(js)), np.int64)])

    ms = np.arange(n + 1) if n <= 32 else np.unique(np.linspace(0, n, 33).round().astype(int))  # A on the first m

    def split(p):  # (m, J_A, J_B): head of A up to m, tail of B from m
        return p[ms][:, :, None] + (p[n][None, None, :] - p[ms][:, None, :])

    X, G, M = split(px), split(pg), split(pm)
    P = np.maximum(head_peak[ms][:, :, None], tail_peak[ms][:, None, :])
    cls = table.layout[js]
    for row, i in enumerate(ms):
        if 0 < i < n:  # a layout change between layer a+i-1 (A) and a+i (B)
            group = engine.boundary_group[a + i]
            R = redistribution_matrix(engine.cost_model, table, group, engine.group_index[group], micro_batch)
            X[row] += R[cls[:, None], cls[None, :]]
    return js, ms, X.ravel(), G.ravel(), M.ravel(), P.ravel(), (len(ms), len(js), len(js))


def seed_plan(engine, table, solver, setting, embeddings, parts_of):
    """The best seeded plan of ``setting`` (``search.setting.Setting``) over ``embeddings`` (``parts_of(e)`` gives
    its per-stage parts), or None."""
    pp, c, in_flight = setting.pp, setting.chunks, setting.in_flight
    L = len(engine.types)
    division = even_division(L, pp)
    bounds = np.concatenate([[0], np.cumsum(division)])
    syncs = setting.syncs
    stages = [
        _stage_candidates(engine, table, int(bounds[s]), int(bounds[s + 1]), in_flight[s], setting.micro_batch)
        for s in range(pp)
    ]
    if any(st is None for st in stages):
        return None
    best = None
    for embedding in embeddings:
        parts = parts_of(embedding)
        picks, xs, gs = [], [], []
        for s, (js, ms, X, G, M, P, shape) in enumerate(stages):
            part = parts[s]
            fits = M + part.memory(in_flight[s]) + np.maximum(P, part.peak_bytes) <= engine.budget
            if not fits.any():
                break
            proxy = np.where(fits, c * X + syncs * G, np.inf)
            i = int(np.argmin(proxy))
            row, ia, ib = np.unravel_index(i, shape)
            picks.append((js, ms[row], ia, ib))
            xs.append(X[i] + part.x_s + (solver.p2p[s, bounds[s + 1]] if s < pp - 1 else 0.0))
            gs.append((G[i] + part.g_s) * syncs)
        else:
            time_s = sum(xs) + (c - 1) * max(xs) + max(gs)
            if best is None or time_s < best[0]:
                best = (time_s, embedding, picks)
    if best is None:
        return None
    layers = []
    for s, (js, m, ia, ib) in enumerate(best[2]):
        n = int(bounds[s + 1] - bounds[s])
        layers += [table.strategies[js[ia]]] * int(m) + [table.strategies[js[ib]]] * (n - int(m))
    plan = Plan(
        world_size=engine.world_size,
        layers=tuple(layers),
        pp=pp,
        pp_division=division,
        pipeline=setting.pipeline,
        chunks=c,
        global_batch=setting.global_batch,
        embedding=best[1],
        grad_sync_every_micro_batch=setting.sync_every_micro_batch,
    )
    prediction = engine.cost_model.evaluate(plan)
    if prediction.budgeted_bytes > engine.budget:
        return None
    return plan, prediction
