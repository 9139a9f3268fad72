"""Stages and the pipeline: exact per-stage (X, G) fronts, the pipeline formula over them, and a
branch-and-bound over pp_division.

For one setting (pp, devices per stage, micro-batch, chunks, in-flight counts, embedding strategy):
stage ``s`` over body layers ``[a, b)`` has a front of (X_s, G_s) pairs whose memory fits the budget.
The iteration time  Σ_s X_s + (c − 1)·max_s X_s + max_s G_s  is minimised exactly over the fronts by
sweeping γ = max_s G_s over every G on them (each stage then takes its fastest point with G ≤ γ).
Divisions are explored depth-first, stage by stage, cut by a lower bound from each stage's fastest
point and the remaining layers' fastest strategies, so no division that could win is skipped.

requires: fronts from search.front; non-negative times and bytes (every term only grows).
ensures:  ``StageSolver.best_division`` returns the exact minimum over divisions and front points.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from galvatron_fx.cost.memory import InFlight
from galvatron_fx.parallel_dims import data_split
from galvatron_fx.passes.search.bounds import RestBound
from galvatron_fx.passes.search.front import Front, class_representatives, extend, pareto_indices, redistribution_matrix
from galvatron_fx.plan import LayerStrategy

_TOL = 1e-12


@dataclass(frozen=True)
class EmbeddingPart:
    """The embedding/head share of one stage (zeros for middle stages); ``layout``: where the embedding's
    output and the head's input live (``parallel_dims.end_layout``; None: the data split)."""

    x_s: float
    g_s: float
    model_state_bytes: int
    activation_bytes: int
    peak_bytes: int
    grad_bytes: int
    optimizer_temp_bytes: int
    layout: LayerStrategy | None = None

    def memory(self, in_flight) -> int:
        """Bytes with ``in_flight`` (cost/memory.py InFlight) micro-batches, transients left out."""
        return int(
            in_flight.layer_bytes(
                self.model_state_bytes, self.activation_bytes, self.grad_bytes, self.optimizer_temp_bytes
            )
        )


@dataclass
class StageFront:
    X: np.ndarray  # ascending
    G: np.ndarray  # descending
    cap: np.ndarray  # index into caps
    layout_class: np.ndarray
    index: np.ndarray


def pipeline_time(fronts: list[tuple[np.ndarray, np.ndarray]], chunks: int) -> tuple[float, list[int]]:
    """min over front points of Σ X + (c-1) max X + max G; returns (time, chosen index per stage)."""
    gammas = np.unique(np.concatenate([G for _, G in fronts]))
    picks = np.empty((len(fronts), len(gammas)), dtype=np.int64)
    times = np.empty((len(fronts), len(gammas)))
    for s, (X, G) in enumerate(fronts):
        i = np.searchsorted(-G, -gammas, side="left")  # first point with G <= γ (G descends)
        valid = i < len(G)
        picks[s] = np.minimum(i, len(G) - 1)
        times[s] = np.where(valid, X[picks[s]], np.inf)
    # with one chunk the max term vanishes (0 · inf would be NaN where a stage has no point under γ)
    total = times.sum(axis=0) + gammas + ((chunks - 1) * times.max(axis=0) if chunks > 1 else 0.0)
    best = int(np.argmin(total))
    return float(total[best]), [int(p) for p in picks[:, best]]


class StageSolver:
    """Everything for one (pp, devices, micro-batch, chunks, in-flight) setting; caches across embeddings."""

    def __init__(
        self,
        engine,
        table,
        pp: int,
        micro_batch: int,
        chunks: int,
        in_flight: tuple[int, ...],
        embedding_parts: list[list[EmbeddingPart]],
        syncs: int = 1,
    ):
        """``syncs``: gradient synchronisations per step (``chunks`` with a sync after every micro-batch)."""
        # One stage: time = c·X + s·G exactly, so fold G into X (2-D fronts) and run the formula with c = 1.
        self.fold = chunks if pp == 1 else None
        self.step_syncs = syncs
        if self.fold:
            table, chunks = engine.folded_table(table, chunks, syncs), 1
        self.time_scale = self.fold or 1
        self.engine, self.table, self.pp = engine, table, pp
        self.micro_batch, self.chunks, self.in_flight = micro_batch, chunks, in_flight
        self.types = engine.types
        L = len(self.types)
        usable = [table.useful[t] for t in self.types]
        peaks = np.concatenate([table.peak[t][ok] for t, ok in zip(self.types, usable)])
        self.caps = np.unique(peaks) if len(peaks) else np.zeros(0, np.int64)
        xmin = np.array([table.x[t][ok].min() if ok.any() else np.inf for t, ok in zip(self.types, usable)])
        self.rest_x = np.concatenate([np.cumsum(xmin[::-1])[::-1], [0.0]])  # Σ_{l >= a} fastest x
        # the first body layer receives the embedding's output, the last one feeds the head: a layer of another
        # layout class than those parts' (the data split, or vsp's) pays a move (cost contract)
        self.split = data_split(engine.world_size // pp)
        self._boundaries: dict[LayerStrategy, tuple[np.ndarray, np.ndarray]] = {}
        self.p2p = np.zeros((pp, L + 1))
        for s in range(pp - 1):
            for b in range(s + 1, L - (pp - 2 - s)):
                self.p2p[s, b] = engine.cost_model.p2p_s(s, pp, engine.world_size // pp, micro_batch, b - 1)
        self._stage_cache: dict = {}
        # what the rest of a plan costs at least, for dropping front points early (search.bounds)
        self.least_in_flight = InFlight.least(in_flight)
        self.rest_bound = RestBound(table, self.types, self.least_in_flight, self.caps, per_cap=pp == 1)
        self.syncs = 1 if self.fold else syncs
        folded_parts = [[self._folded(p) for p in parts] for parts in embedding_parts]
        self.embedding_min_s = min((sum(p.x_s for p in parts) for parts in folded_parts), default=0.0)
        self.embedding_min_bytes = min(
            (sum(p.memory(self.least_in_flight) for p in parts) for parts in folded_parts), default=0
        )

    def boundary_s(self, layout: LayerStrategy | None) -> tuple[np.ndarray, np.ndarray]:
        """Per layout class: moving the embedding's output in ``layout`` (None: the data split) into the first
        body layer, and the last body layer's output into the head's ``layout``."""
        layout = layout or self.split
        if layout not in self._boundaries:
            reps, cost, L = class_representatives(self.table), self.engine.cost_model, len(self.types)
            scale, mb = self.table.redistribution_scale, self.micro_batch
            self._boundaries[layout] = (
                np.array([cost.redistribution_s(layout, r, 0, mb) for r in reps]) * scale,
                np.array([cost.redistribution_s(r, layout, L, mb) for r in reps]) * scale,
            )
        return self._boundaries[layout]

    # -- layer and stage fronts --------------------------------------------------------------------------
    def layer_front(
        self, a: int, b: int, in_flight, cap_index: int, entry: LayerStrategy | None = None
    ) -> Front | None:
        """The front of layers ``[a, b)``; the first layer of the model (``a == 0``) receives the embedding's
        output in layout ``entry`` (None: the data split)."""
        entry = (entry or self.split) if a == 0 else None
        key = (
            a == 0,
            entry,
            self.types[a:b],
            self.engine.boundary_group[a + 1 : b],
            in_flight,
            cap_index,
            self.chunks,
            self.least_in_flight,
        )
        memo = self.engine.front_memo.setdefault(id(self.table), {})
        bound_s = self.bound_s()
        if key in memo and memo[key][1] >= bound_s:
            return memo[key][0]
        prev = self.layer_front(a, b - 1, in_flight, cap_index, entry) if b - a > 1 else None
        if b - a > 1 and (prev is None or not prev.M):
            memo[key] = (None, bound_s)
            return None
        cap = int(self.caps[cap_index])
        redis = None
        if prev is not None:
            group = self.engine.boundary_group[b - 1]
            redis = redistribution_matrix(
                self.engine.cost_model, self.table, group, self.engine.group_index[group], self.micro_batch
            )
        m_avail = self.pp * self.engine.budget - cap - self.embedding_min_bytes
        promising = self.rest_bound.promising(
            self.types[a:b], cap_index, m_avail, self.chunks, self.syncs, self.embedding_min_s, bound_s, self.pp
        )
        front = extend(
            prev,
            self.table,
            self.types[b - 1],
            redis,
            in_flight,
            cap,
            self.engine.budget - cap,
            promising,
            self.boundary_s(entry)[0] if a == 0 else None,
        )
        memo[key] = (front, bound_s)
        return front

    def bound_s(self) -> float:
        """The incumbent's iteration time (global batch / best samples/s): a plan must beat it."""
        if self.engine.best_throughput <= 0:
            return np.inf
        return self.time_scale * self.chunks * self.micro_batch / self.engine.best_throughput

    def _folded(self, part: EmbeddingPart) -> EmbeddingPart:
        if not self.fold:
            return part
        return dataclasses.replace(part, x_s=self.fold * part.x_s + self.step_syncs * part.g_s, g_s=0.0)

    def stage_front(self, s: int, a: int, b: int, part: EmbeddingPart) -> StageFront | None:
        in_flight = self.in_flight[s]
        part = self._folded(part)
        last = b == len(self.types)
        key = (a == 0, last, self.types[a:b], self.engine.boundary_group[a + 1 : b], in_flight, part)
        if key in self._stage_cache:
            return self._stage_cache[key]
        xs, gs, caps, cls, idx = [], [], [], [], []
        emb_bytes = part.memory(in_flight)
        exit_s = self.boundary_s(part.layout)[1]
        for ci, cap in enumerate(self.caps):
            front = self.layer_front(a, b, in_flight, ci, part.layout)
            if front is None or not front.M:
                continue
            M, X, G, C, I = front.merged()  # noqa: E741 (the front's index column)
            ok = np.flatnonzero(M + emb_bytes + max(int(cap), part.peak_bytes) <= self.engine.budget)
            xs.append(X[ok] + part.x_s + (exit_s[C[ok]] if last else 0.0)), gs.append(G[ok] + part.g_s)
            caps.append(np.full(len(ok), ci)), cls.append(C[ok]), idx.append(I[ok])
        result = None
        if xs and sum(map(len, xs)):
            X, G = np.concatenate(xs), np.concatenate(gs)
            if not self.fold:
                G = G * self.syncs
            keep = pareto_indices(X, G, np.zeros(len(X)))
            result = StageFront(
                X[keep], G[keep], np.concatenate(caps)[keep], np.concatenate(cls)[keep], np.concatenate(idx)[keep]
            )
        self._stage_cache[key] = result
        return result

    # -- divisions ---------------------------------------------------------------------------------------
    def best_division(self, parts: list[EmbeddingPart], bound_s: float):
        """Exact min iteration time over divisions and fronts, if below ``bound_s``: (time, division, picks)."""
        L, pp, c = len(self.types), self.pp, self.chunks
        best = [bound_s, None, None]
        last_x = parts[-1].x_s

        def beats(lower_bound: float) -> bool:  # ties are kept: they may be the optimum itself
            return lower_bound <= best[0] * (1 + _TOL)

        def visit(s: int, a: int, chosen: list, sum_x: float, max_x: float, max_g: float):
            if s == pp - 1:
                front = self.stage_front(s, a, L, parts[s])
                if front is None:
                    return
                fr = [(f.X + self.p2p[t, e], f.G) for t, (f, _, e) in enumerate(chosen)] + [(front.X, front.G)]
                if not beats(sum_x + front.X[0] + (c - 1) * max(max_x, front.X[0]) + max(max_g, front.G[-1])):
                    return
                time_s, picks = pipeline_time(fr, c)
                if time_s < best[0]:
                    best[:] = [time_s, [e - b0 for (_, b0, e) in chosen] + [L - a], (chosen + [(front, a, L)], picks)]
                return
            options = []
            for b in range(a + 1, L - (pp - 1 - s) + 1):
                front = self.stage_front(s, a, b, parts[s])
                if front is None:
                    continue
                x0 = front.X[0] + self.p2p[s, b]
                rest = self.rest_x[b] + last_x
                lb = sum_x + x0 + rest + (c - 1) * max(max_x, x0, rest / (pp - 1 - s)) + max(max_g, front.G[-1])
                if beats(lb):
                    options.append((lb, b, front, x0))
            for lb, b, front, x0 in sorted(options, key=lambda o: o[0]):
                if not beats(lb):
                    break
                visit(s + 1, b, chosen + [(front, a, b)], sum_x + x0, max(max_x, x0), max(max_g, front.G[-1]))

        visit(0, 0, [], 0.0, 0.0, 0.0)
        return best if best[1] is not None else None
