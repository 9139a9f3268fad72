"""Exact Pareto fronts of one pipeline stage's layers: the dynamic programme inside a stage.

A stage's layers are chosen so that the stage's memory ``M`` (model states + in-flight activations,
bytes, exact integers), its compute-and-communication time per micro-batch ``X`` and its unhidden
gradient synchronisation ``G`` are Pareto-optimal. All three are kept exactly (no memory rounding): the
pipeline formula couples stages through ``max X`` and ``max G``, so a single scalar per stage would not
be exact, and rounding memory would lose plans right at the budget. The front after each layer is kept
per layout class of the last layer, because the redistribution to the next layer depends on it.

requires: a CostModel following the cost contract; strategies whose layout (tp, sp, consecutive) is
          equal redistribute alike (the contract's "0.0 when layouts are equal", extended to pairs).
ensures:  every plan of the stage that could be optimal is represented by a point on the front
          (dominance in (M, X, G) within a class loses nothing); points beyond the memory limit or the
          time limit (an incumbent bound) are dropped, which is safe since every term only grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from galvatron_fx.parallel_dims import activation_strategy
from galvatron_fx.plan import LayerStrategy

_BLOCK = 128
_EARLIER = np.tri(_BLOCK, k=-1, dtype=bool)  # [i, j]: j comes before i within a block


def pareto_indices(M: np.ndarray, X: np.ndarray, G: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """Indices of the points not dominated in (M, X, G), all minimised, within each ``group`` (points of
    different groups never dominate each other); of equal points one is kept. Sorted by (group, M, X)."""
    n = len(M)
    if n <= 1:
        return np.arange(n)
    grp = np.zeros(n, np.int64) if group is None else group
    order = np.lexsort((G, X, M, grp))
    x, g, c = X[order], G[order], grp[order]
    if g.min() == g.max():
        # 2-D: in (group, M) order a point survives iff its X beats every earlier X of its group. Exact
        # integer ranks shifted down per group make one running minimum restart at each group.
        rank = np.unique(x, return_inverse=True)[1].astype(np.int64) - c * (n + 1)
        keep = np.empty(n, bool)
        keep[0] = True
        keep[1:] = rank[1:] < np.minimum.accumulate(rank)[:-1]
        return order[keep]
    keep = np.zeros(n, bool)
    bounds = np.flatnonzero(np.diff(c)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])):
        keep[lo:hi] = _front_3d(x[lo:hi], g[lo:hi])
    return order[keep]


def _front_3d(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Survivors among points already in (M, X, G) order: a point is dominated iff an earlier one has X and
    G no larger. Earlier survivors are kept as their 2-D (X, G) staircase (X ascending, G descending), so
    each point asks one binary search: the least G among survivors with X <= its X. Points of the same
    block are compared with each other directly."""
    keep = np.zeros(len(x), bool)
    stair_x, stair_g = np.empty(0), np.empty(0)
    for start in range(0, len(x), _BLOCK):
        bx, bg = x[start : start + _BLOCK], g[start : start + _BLOCK]
        at = np.searchsorted(stair_x, bx, side="right") - 1
        dom = (at >= 0) & (stair_g[np.maximum(at, 0)] <= bg) if len(stair_x) else np.zeros(len(bx), bool)
        inner = (bx[None, :] <= bx[:, None]) & (bg[None, :] <= bg[:, None]) & _EARLIER[: len(bx), : len(bx)]
        dom |= inner.any(axis=1)
        keep[start : start + _BLOCK] = ~dom
        # the new staircase: the 2-D front of the old one and this block's survivors
        sx, sg = np.concatenate([stair_x, bx[~dom]]), np.concatenate([stair_g, bg[~dom]])
        by = np.lexsort((sg, sx))
        sx, sg = sx[by], sg[by]
        lower = np.concatenate([[True], sg[1:] < np.minimum.accumulate(sg)[:-1]])
        stair_x, stair_g = sx[lower], sg[lower]
    return keep


@dataclass
class CostTable:
    """Per-layer costs of every allowed strategy for one (devices per stage, micro-batch)."""

    strategies: list[LayerStrategy]
    layout: np.ndarray  # layout class of each strategy
    layouts: list[tuple]  # layout_key per class: (tp, sp, tp_consecutive, features split) of the activation layout
    allowed: dict[str, np.ndarray]  # per layer type: may the layer run the strategy
    ms: dict[str, np.ndarray]  # model-state bytes (int64)
    act: dict[str, np.ndarray]  # activation bytes of one micro-batch (int64)
    x: dict[str, np.ndarray]  # fwd + bwd seconds
    g: dict[str, np.ndarray]  # grad sync seconds
    peak: dict[str, np.ndarray]  # transient bytes (int64)
    grad: dict[str, np.ndarray]  # the gradient part of ms (int64)
    temp: dict[str, np.ndarray]  # optimizer-step temporaries (int64)
    redistribution: dict = field(default_factory=dict)  # boundary group → class × class seconds
    useful: dict = field(default_factory=dict)  # per layer type: allowed and not dominated
    redistribution_scale: float = 1.0  # folded tables: seconds count ``chunks`` times
    _memory: dict = field(default_factory=dict)  # (layer type, in-flight) → bytes, see memory()

    def memory(self, layer_type: str, in_flight) -> np.ndarray:
        """Bytes of each strategy of ``layer_type`` with ``in_flight`` (cost/memory.py InFlight) micro-batches."""
        key = (layer_type, in_flight)
        if key not in self._memory:
            self._memory[key] = in_flight.layer_bytes(
                self.ms[layer_type], self.act[layer_type], self.grad[layer_type], self.temp[layer_type]
            ).astype(np.int64)
        return self._memory[key]


def mark_useful(table: CostTable) -> CostTable:
    """Per layer type, the allowed strategies that no other allowed strategy of the same layout class beats
    or ties in every term (model states, activations, time, sync, peak): a dominated strategy can be swapped
    for its dominator in any plan without changing a redistribution, and nothing gets worse."""
    same_class = table.layout[:, None] == table.layout[None, :]
    earlier = np.tri(len(table.strategies), k=-1, dtype=bool).T  # [i, j]: i < j, the tie-break
    for t, ok in table.allowed.items():
        terms = [table.ms[t], table.act[t], table.x[t], table.g[t], table.peak[t], table.grad[t], table.temp[t]]
        no_worse = np.logical_and.reduce([v[:, None] <= v[None, :] for v in terms])  # [i, j]: i ≤ j everywhere
        better = np.logical_or.reduce([v[:, None] < v[None, :] for v in terms])
        dominated = (no_worse & (better | earlier) & same_class & ok[:, None]).any(axis=0)
        table.useful[t] = ok & ~dominated
    return table


def subset(table: CostTable, keep: list[int]) -> CostTable:
    """The same costs for the strategies ``keep`` only (uniform spaces search one strategy at a time)."""
    pick = np.asarray(keep, dtype=np.int64)
    classes = sorted(set(table.layout[pick].tolist()))
    remap = {c: i for i, c in enumerate(classes)}
    out = CostTable(
        [table.strategies[j] for j in keep],
        np.array([remap[int(c)] for c in table.layout[pick]], dtype=np.int64),
        [table.layouts[c] for c in classes],
        *(
            {t: v[pick] for t, v in d.items()}
            for d in (table.allowed, table.ms, table.act, table.x, table.g, table.peak, table.grad, table.temp)
        ),
    )
    out.redistribution = {key: m[np.ix_(classes, classes)] for key, m in table.redistribution.items()}
    out.redistribution_scale = table.redistribution_scale
    return mark_useful(out)


def folded(table: CostTable, chunks: int, syncs: int = 1) -> CostTable:
    """Costs with X := chunks·X + syncs·G and G := 0: with one stage the iteration time is exactly c·X + G, so
    the fronts lose a dimension."""
    out = CostTable(
        table.strategies,
        table.layout,
        table.layouts,
        table.allowed,
        table.ms,
        table.act,
        {t: chunks * table.x[t] + syncs * table.g[t] for t in table.x},
        {t: np.zeros_like(v) for t, v in table.g.items()},
        table.peak,
        table.grad,
        table.temp,
    )
    out.redistribution = table.redistribution  # shared cache of unscaled matrices
    out.redistribution_scale = table.redistribution_scale * chunks
    return mark_useful(out)


def layout_key(strategy: LayerStrategy) -> tuple:
    """The layout class of ``strategy``: where its activations live between layers (a grid layer's as a 1D
    layer's over its rows, ``activation_strategy``, split along the features); strategies of a class
    redistribute alike."""
    rows = activation_strategy(strategy)
    return (rows.tp, rows.sp, rows.tp_consecutive, strategy.tp_mode != "1d")


def build_cost_table(
    cost_model,
    strategies: list[LayerStrategy],
    micro_batch: int,
    left_out: dict,
    busy_share: float = 1.0,
    deferred_sync: bool = False,
) -> CostTable:
    """Query the cost model once per (layer type, strategy) at ``busy_share`` (the cost model's
    ``busy_share`` of the setting's pipeline) and ``deferred_sync`` (``Plan.defers_grad_sync``); record why
    strategies are left out."""
    layouts = list(dict.fromkeys(layout_key(s) for s in strategies))
    index = {key: i for i, key in enumerate(layouts)}
    table = CostTable(
        strategies,
        np.array([index[layout_key(s)] for s in strategies], dtype=np.int64),
        layouts,
        {},
        {},
        {},
        {},
        {},
        {},
        {},
        {},
    )
    for layer_type in dict.fromkeys(cost_model.layer_types):
        n = len(strategies)
        ok = np.zeros(n, bool)
        ms, act, peak, grad, temp = (np.zeros(n, np.int64) for _ in range(5))
        x, g = np.zeros(n), np.zeros(n)
        for j, strategy in enumerate(strategies):
            reason = cost_model.unsupported_reason(layer_type, strategy)
            if reason is not None:
                left_out.setdefault(f"layer type {layer_type}: {reason}", set()).add(strategy.short())
                continue
            cost = cost_model.layer_cost(layer_type, strategy, micro_batch, busy_share, deferred_sync)
            ok[j] = True
            ms[j], act[j], peak[j] = cost.model_state_bytes, cost.activation_bytes, cost.transient_bound_bytes
            grad[j], temp[j] = cost.grad_bytes, cost.optimizer_temp_bytes
            x[j], g[j] = cost.fwd_s + cost.bwd_s, cost.grad_sync_s
        table.allowed[layer_type], table.ms[layer_type], table.act[layer_type] = ok, ms, act
        table.x[layer_type], table.g[layer_type], table.peak[layer_type] = x, g, peak
        table.grad[layer_type], table.temp[layer_type] = grad, temp
    return mark_useful(table)


def class_representatives(table: CostTable) -> list[LayerStrategy]:
    """One strategy per layout class (strategies of a class redistribute alike)."""
    return [table.strategies[int(np.flatnonzero(table.layout == c)[0])] for c in range(len(table.layouts))]


def redistribution_matrix(cost_model, table: CostTable, key, boundary_index: int, micro_batch: int) -> np.ndarray:
    """Seconds to redistribute between every pair of layout classes at ``boundary_index`` (the cost model's
    values cached per ``key``, the boundary's group), times the table's ``redistribution_scale``."""
    if key not in table.redistribution:
        reps = class_representatives(table)
        table.redistribution[key] = np.array(
            [[cost_model.redistribution_s(a, b, boundary_index, micro_batch) for b in reps] for a in reps]
        )
    matrix = table.redistribution[key]
    return matrix if table.redistribution_scale == 1.0 else matrix * table.redistribution_scale


@dataclass
class Front:
    """Pareto points after a run of layers, per layout class of the last layer, with back-pointers."""

    prev: "Front | None"
    M: dict[int, np.ndarray]
    X: dict[int, np.ndarray]
    G: dict[int, np.ndarray]
    parent_class: dict[int, np.ndarray]
    parent_index: dict[int, np.ndarray]
    strategy: dict[int, np.ndarray]

    def merged(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All points: (M, X, G, class, index)."""
        classes = sorted(self.M)
        if not classes:
            empty = np.empty(0)
            return empty, empty, empty, empty.astype(np.int64), empty.astype(np.int64)
        cat = np.concatenate
        return (
            cat([self.M[c] for c in classes]),
            cat([self.X[c] for c in classes]),
            cat([self.G[c] for c in classes]),
            cat([np.full(len(self.M[c]), c) for c in classes]),
            cat([np.arange(len(self.M[c])) for c in classes]),
        )

    def backtrack(self, layout_class: int, index: int) -> list[int]:
        """Strategy indices of the layers, first to last, for one point."""
        out, front = [], self
        while front is not None:
            out.append(int(front.strategy[layout_class][index]))
            layout_class, index = (
                int(front.parent_class[layout_class][index]),
                int(front.parent_index[layout_class][index]),
            )
            front = front.prev
        return out[::-1]


def extend(
    front: Front | None,
    table: CostTable,
    layer_type: str,
    redistribution: np.ndarray | None,
    in_flight,
    cap_bytes: int,
    memory_limit: int,
    promising=None,
    entry_s: np.ndarray | None = None,
) -> Front:
    """The front after one more layer of ``layer_type`` (strategies with peak <= ``cap_bytes`` only);
    ``promising(M, X, G)`` (a mask) drops points no plan that beats the incumbent can extend. A first layer
    (``front`` None) pays ``entry_s[layout class]`` to receive its input, if given."""
    usable = np.flatnonzero(table.useful[layer_type] & (table.peak[layer_type] <= cap_bytes))
    mem = table.memory(layer_type, in_flight)[usable]
    x, g, cls = table.x[layer_type][usable], table.g[layer_type][usable], table.layout[usable]
    out = Front(front, {}, {}, {}, {}, {}, {})
    if front is None:
        M, X, G, C = mem, x + (entry_s[cls] if entry_s is not None else 0.0), g.copy(), cls
        pc, pi, st = np.full(len(usable), -1), np.full(len(usable), -1), usable
    else:
        sM, sX, sG, sC, sI = front.merged()
        if len(sM) == 0 or len(usable) == 0:
            return out
        targets = np.unique(cls)
        # sources seen from each target class (redistribution differs), pruned per target class first
        tM, tX, tG = (
            np.tile(sM, len(targets)),
            (sX[None, :] + redistribution[sC][:, targets].T).ravel(),
            np.tile(sG, len(targets)),
        )
        tT = np.repeat(targets, len(sM))
        src = np.tile(np.arange(len(sM)), len(targets))
        keep = pareto_indices(tM, tX, tG, tT)
        tM, tX, tG, tT, src = tM[keep], tX[keep], tG[keep], tT[keep], src[keep]
        # every kept source × every strategy of its target class
        pair_src, pair_j = np.nonzero(tT[:, None] == cls[None, :])
        M, X, G = tM[pair_src] + mem[pair_j], tX[pair_src] + x[pair_j], tG[pair_src] + g[pair_j]
        C, pc, pi, st = cls[pair_j], sC[src[pair_src]], sI[src[pair_src]], usable[pair_j]
    ok = M <= memory_limit
    if promising is not None:
        ok &= promising(M, X, G)
    ok = np.flatnonzero(ok)
    M, X, G, C, pc, pi, st = M[ok], X[ok], G[ok], C[ok], pc[ok], pi[ok], st[ok]
    keep = pareto_indices(M, X, G, C)
    M, X, G, C, pc, pi, st = M[keep], X[keep], G[keep], C[keep], pc[keep], pi[keep], st[keep]
    bounds = np.flatnonzero(np.diff(C)) + 1  # pareto_indices sorts by group first
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(C)]])):
        if hi > lo:
            c = int(C[lo])
            out.M[c], out.X[c], out.G[c] = M[lo:hi], X[lo:hi], G[lo:hi]
            out.parent_class[c], out.parent_index[c], out.strategy[c] = pc[lo:hi], pi[lo:hi], st[lo:hi]
    return out
