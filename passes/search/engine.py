"""Search the layerwise hybrid-parallel plan with the highest throughput under a per-device memory budget.

``search(cost_model, world_size, "36GB", space)`` returns the Plan maximising samples/s under
``cost_model.evaluate`` — the cost contract's formula, rebuilt from its per-layer terms:

1. settings (pp, global batch, chunks, pipeline, default dp type) ordered by an upper bound on samples/s
   (the Lagrangian bound of fitting every layer into pp memory budgets, search_bound); a setting whose
   in-flight counts are nowhere lower than another's of the same (pp, batch, chunks) is skipped (same
   time, no less memory: GPipe next to 1F1B);
2. a seeded plan (search_seed, priced by evaluate) for every setting that might win, so that the exact
   pass starts from a near-optimal incumbent; then the exact pass, cut as soon as the bound cannot win,
   and skipping each setting whose tighter bound (per stage, its own budget and in-flight count, over the
   best division) cannot;
3. per (devices per stage, micro-batch): one cost-model query per (layer type, strategy); strategies
   another of the same layout beats in every term are left out; identical layer runs share fronts;
4. per stage: exact Pareto fronts over (memory, time, gradient sync) — search_front — whose points are
   dropped as soon as the rest of the plan cannot beat the incumbent (search_bound);
5. per setting: branch-and-bound over pp_division and the embedding strategy, with the exact pipeline
   formula over the fronts — search_stage.

Memory: a stage fits when its additive bound (``Prediction.memory_bound_bytes_per_stage``: every layer in its
worst phase, the largest transient on top) fits the budget; the predicted peak never exceeds that bound.

Data-parallel types follow Galvatron's ``default_dp_type``: each setting fixes one of ddp/zero2 for every
layer that is not ZeRO-3 and for the embedding/head replicas (unless ``embed_sdp``); ZeRO-3 is free per
layer. Both modes are searched, so the optimum is exact over that space (the brute force walks the same).

requires: a CostModel following docs' cost contract (layer_cost, embedding_cost, redistribution_s, p2p_s,
          in_flight, busy_share, unsupported_reason, evaluate).
ensures:  the returned plan is the optimum of evaluate() over the space (ties broken arbitrarily), its
          ``prediction`` is evaluate(plan), its provenance names model, cluster, budget, version and
          ``search_time_s``; strategies a layer cannot run are left out with the reason recorded.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from galvatron_fx.cost.memory import InFlight
from galvatron_fx.errors import PlanError
from galvatron_fx.plan import Plan
from galvatron_fx.units import format_bytes, parse_bytes

from galvatron_fx.passes.search.bounds import RestBound, StageBound, division_bound_s
from galvatron_fx.passes.search.front import build_cost_table, folded, subset
from galvatron_fx.passes.search.seed_plan import seed_plan
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.passes.search.stage_solver import EmbeddingPart, StageSolver

Progress = Callable[[int, int, float], None]   # (settings done, settings total, best samples/s so far)


def search(cost_model, world_size: int, memory_budget: "int | str", space: SearchSpace | None = None, *,
           progress: Progress | None = None, provenance: dict[str, Any] | None = None) -> Plan:
    """The plan with the highest predicted samples/s whose every stage fits ``memory_budget`` bytes per device.

    Raises PlanError when nothing fits, naming the smallest budget that does and its plan."""
    started = time.perf_counter()
    engine = SearchEngine(cost_model, world_size, parse_bytes(memory_budget), space or SearchSpace(), progress)
    plan = engine.run()
    if plan is None:
        raise engine.infeasible_error()
    from galvatron_fx import __version__
    record = {"model": None, "cluster": None, **(provenance or {}), "memory_budget_bytes": engine.budget,
              "version": __version__, "search_time_s": round(time.perf_counter() - started, 4),
              "search_settings_visited": engine.visited, "left_out": engine.left_out_summary()}
    return Plan(**{**_fields(plan), "prediction": cost_model.evaluate(plan), "provenance": record})


def _fields(plan: Plan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in plan.__dataclass_fields__}


class SearchEngine:
    """State of one search: caches, incumbent, reasons for left-out strategies."""

    def __init__(self, cost_model, world_size: int, budget: int, space: SearchSpace, progress: Progress | None):
        self.cost_model, self.world_size, self.budget, self.space, self.progress = cost_model, world_size, budget, space, progress
        self.types = tuple(cost_model.layer_types)
        self.boundary_group, self.group_index = self._boundary_groups()
        self.best_throughput = 0.0
        self.best: Plan | None = None
        self.front_memo: dict = {}
        self.tables: dict[tuple[int, int], Any] = {}
        self.embedding_parts: dict = {}
        self.uniform_tables: dict = {}
        self.folded_tables: dict = {}
        self.rest_bounds: dict = {}
        self.stage_bounds: dict = {}
        self.solvers: dict = {}
        self.left_out: dict[str, set] = {}
        self.visited = 0

    def _boundary_groups(self) -> tuple[tuple, dict]:
        """Boundaries whose redistribution costs agree share a group: between the same layer types, and
        equal on a probe (a cut whose activations differ in size gets a group of its own). Runs of layers
        with equal types and groups share their fronts."""
        group, first = [None], {}
        probe = None
        if self.world_size % 2 == 0:
            from galvatron_fx.plan import LayerStrategy
            probe = (LayerStrategy(tp=1, dp=self.world_size), LayerStrategy(tp=2, dp=self.world_size // 2, sp="megatron"))
        for i in range(1, len(self.types)):
            value = self.cost_model.redistribution_s(*probe, i, 1) if probe else 0.0
            key = (self.types[i - 1], self.types[i], value)
            first.setdefault(key, i)
            group.append(key)
        return tuple(group), first

    # -- settings ----------------------------------------------------------------------------------------
    def settings(self) -> list[tuple]:
        """(upper bound on samples/s, pp, global batch, chunks, pipeline, in-flight) for every setting."""
        out = []
        L = len(self.types)
        pps = self.space.pp_degrees(self.world_size, L)
        if not pps:
            self.left_out.setdefault(f"no pipeline degree fits world size {self.world_size} and {L} layers "
                                     f"(max_pp {self.space.max_pp})", set())
        for pp, mode in ((p, m) for p in pps for m in self.space.default_dp_types()):
            devices = self.world_size // pp
            strategies = self.space.layer_strategies(devices, mode)
            for gb in self.space.global_batches():
                for c in self.space.chunk_counts(gb):
                    mb = gb // c
                    if mb % devices:
                        self.left_out.setdefault(f"micro-batch {mb} does not give each of the {devices} devices of a stage "
                                                 "its own samples", set()).add(f"pp{pp} batch {gb} chunks {c}")
                        continue
                    candidates = {}
                    for pipeline in self.space.pipelines:
                        k = tuple(self.cost_model.in_flight(pipeline, pp, s, c) for s in range(pp))
                        candidates.setdefault(k, pipeline)   # both schedules keep the same micro-batches: one search
                    for k, pipeline in candidates.items():
                        if any(other != k and all(a <= b for a, b in zip(other, k)) for other in candidates):
                            continue   # fewer micro-batches in flight everywhere: same time, no more memory
                        table = self.table(self.table_key(pp, c, mb, mode), strategies)  # every dp divides mb
                        out.append((gb / self.time_lower_bound(table, pp, c, mb, k, mode), pp, gb, c, pipeline, k, mode))
        out.sort(key=lambda item: -item[0])
        return out

    def folded_table(self, table, chunks: int):
        """``table`` with X := chunks·X + syncs·G (one stage: the iteration time is exactly that sum)."""
        key = (id(table), chunks)
        if key not in self.folded_tables:
            syncs = chunks if self.space.grad_sync_every_micro_batch else 1
            self.folded_tables[key] = (table, folded(table, chunks, syncs))
        return self.folded_tables[key][1]

    def table_key(self, pp: int, c: int, mb: int, mode: str) -> tuple:
        """(devices per stage, micro-batch, dp mode, busy share): what a setting's layer costs depend on."""
        return self.world_size // pp, mb, mode, self.cost_model.busy_share(pp, c)

    def table(self, key: tuple, strategies):
        if key not in self.tables:
            _, mb, _, share = key
            self.tables[key] = build_cost_table(self.cost_model, strategies, mb, self.left_out, share)
        return self.tables[key]

    def time_lower_bound(self, table, pp: int, c: int, mb: int, k: tuple[int, ...], mode: str) -> float:
        """No plan of this setting is faster: T >= (1 + (c-1)/pp)·Σ_s X_s, and the layers' Σ X is at least the
        Lagrangian bound of fitting them all into pp budgets (search_bound); with one stage T = c·X + G exactly."""
        if not all(table.useful[t].any() for t in self.types):
            return np.inf
        devices = self.world_size // pp
        weight = 1.0
        if pp == 1:
            table = self.folded_table(table, c)
        else:
            weight = 1 + (c - 1) / pp
        k_rest = InFlight.least(k)
        key = (id(table), k_rest)
        if key not in self.rest_bounds:
            caps = np.array([max(int(table.peak[t][table.useful[t]].max()) for t in self.types)])
            self.rest_bounds[key] = RestBound(table, self.types, k_rest, caps, per_cap=False)
        bound = self.rest_bounds[key]
        syncs = c if self.space.grad_sync_every_micro_batch else 1
        emb_s, emb_bytes = np.inf, np.inf
        for embedding in self.space.embedding_strategies(devices, mode):
            parts = self.parts(devices, mb, pp, c, embedding, mode)
            emb_s = min(emb_s, sum(c * p.x_s + syncs * p.g_s if pp == 1 else p.x_s for p in parts))
            emb_bytes = min(emb_bytes, sum(p.memory(k_rest) for p in parts))
        rest = bound.total[0]
        m_avail = pp * self.budget - emb_bytes
        layers_s = float(np.max(rest - bound.lam * m_avail - 1e-9 * (np.abs(rest) + bound.lam * (2 * abs(m_avail) + 1))))
        return weight * (max(layers_s, 0.0) + emb_s) + 1e-30

    def stage_time_lower_bound(self, pp: int, gb: int, c: int, k: tuple[int, ...], mode: str) -> float:
        """A tighter bound than ``time_lower_bound``, for the settings the exact pass reaches: with stage ``s``
        over layers ``[a, b)`` taking at least the Lagrangian bound of fitting them into its own budget with
        its own in-flight count (search_bound ``StageBound``) plus its embedding/head part,
        T >= Σ_s X_s + (c − 1)·max_s X_s over the best division; with one stage T = c·X + G exactly."""
        mb = gb // c
        table = self.tables[self.table_key(pp, c, mb, mode)]
        if not all(table.useful[t].any() for t in self.types):
            return np.inf
        devices = self.world_size // pp
        syncs = c if self.space.grad_sync_every_micro_batch else 1
        if pp == 1:
            table = self.folded_table(table, c)
        best, spans_s = np.inf, {}   # middle stages have no part: their spans repeat across embeddings
        for embedding in self.space.embedding_strategies(devices, mode):
            spans = []
            for s, part in enumerate(self.parts(devices, mb, pp, c, embedding, mode)):
                key = (k[s], part.memory(k[s]) + part.peak_bytes)
                if key not in spans_s:
                    if (id(table), k[s]) not in self.stage_bounds:
                        self.stage_bounds[id(table), k[s]] = StageBound(table, self.types, k[s])
                    spans_s[key] = self.stage_bounds[id(table), k[s]].spans_s(self.budget - key[1])
                spans.append(spans_s[key] + (c * part.x_s + syncs * part.g_s if pp == 1 else part.x_s))
            best = min(best, division_bound_s(spans, 1 if pp == 1 else c))
        return best * (1 - 1e-9) + 1e-30

    def parts(self, devices: int, mb: int, pp: int, c: int, embedding, mode: str) -> list[EmbeddingPart]:
        out, share = [], self.cost_model.busy_share(pp, c)
        for s in range(pp):
            key = (devices, mb, embedding, s == 0, s == pp - 1, mode, share)
            if key not in self.embedding_parts:
                cost = self.cost_model.embedding_cost(embedding, devices, mb, first_stage=s == 0, last_stage=s == pp - 1,
                                                      busy_share=share)
                self.embedding_parts[key] = EmbeddingPart(cost.fwd_s + cost.bwd_s, cost.grad_sync_s, cost.model_state_bytes,
                                                          cost.activation_bytes, cost.transient_bound_bytes, cost.grad_bytes,
                                                          cost.optimizer_temp_bytes)
            out.append(self.embedding_parts[key])
        return out

    # -- the search --------------------------------------------------------------------------------------
    def run(self) -> Plan | None:
        settings = self.settings()
        # First a cheap seeded plan for every setting that might win: the exact pass then prunes with the best.
        for upper, pp, gb, c, pipeline, k, mode in settings:
            if upper <= self.best_throughput * (1 + 1e-12):
                break
            self.solve_setting(pp, gb, c, pipeline, k, mode, exact=False)
        for done, (upper, pp, gb, c, pipeline, k, mode) in enumerate(settings):
            if upper <= self.best_throughput * (1 + 1e-12):
                break   # sorted by upper bound: nothing later can win
            self.visited += 1
            if gb / self.stage_time_lower_bound(pp, gb, c, k, mode) > self.best_throughput * (1 + 1e-12):
                self.solve_setting(pp, gb, c, pipeline, k, mode)
            if self.progress:
                self.progress(done + 1, len(settings), self.best_throughput)
        if self.progress:
            self.progress(len(settings), len(settings), self.best_throughput)
        return self.best

    def solve_setting(self, pp: int, gb: int, c: int, pipeline: str, k: tuple[int, ...], mode: str, exact: bool = True) -> None:
        key = self.table_key(pp, c, gb // c, mode)
        full = self.tables[key]
        if not self.space.uniform:
            self.solve_table(full, pp, gb, c, pipeline, k, mode, exact)
            return
        for j in range(len(full.strategies)):   # one strategy for every layer: a table of one
            if all(full.allowed[t][j] for t in self.types):
                uniform_key = (*key, j)
                if uniform_key not in self.uniform_tables:
                    self.uniform_tables[uniform_key] = subset(full, [j])
                self.solve_table(self.uniform_tables[uniform_key], pp, gb, c, pipeline, k, mode, exact)

    def solver(self, table, pp: int, gb: int, c: int, k: tuple[int, ...], mode: str) -> StageSolver:
        key = (id(table), pp, gb, c, k)
        if key not in self.solvers:
            devices, mb = self.world_size // pp, gb // c
            embeddings = self.space.embedding_strategies(devices, mode)
            self.solvers[key] = StageSolver(self, table, pp, mb, c, k, [self.parts(devices, mb, pp, c, e, mode) for e in embeddings])
        return self.solvers[key]

    def solve_table(self, table, pp: int, gb: int, c: int, pipeline: str, k: tuple[int, ...], mode: str, exact: bool = True) -> None:
        devices, mb = self.world_size // pp, gb // c
        embeddings = self.space.embedding_strategies(devices, mode)
        solver = self.solver(table, pp, gb, c, k, mode)
        if not exact:
            seeded = seed_plan(self, table, solver, pp, gb, c, pipeline, k, embeddings,
                               lambda e: self.parts(devices, mb, pp, c, e, mode))
            if seeded is not None and seeded[1].samples_per_s > self.best_throughput:
                self.best, self.best_throughput = seeded[0], seeded[1].samples_per_s
            return
        self.solvers.pop((id(table), pp, gb, c, k), None)   # solved once: its caches are not needed again
        ranked = sorted(embeddings, key=lambda e: sum(p.x_s for p in self.parts(devices, mb, pp, c, e, mode)))
        for embedding in ranked:
            bound_s = gb / self.best_throughput if self.best_throughput > 0 else np.inf
            found = solver.best_division(self.parts(devices, mb, pp, c, embedding, mode), bound_s)
            if found is None:
                continue
            time_s, division, (stages, picks) = found
            layers = []
            for s, ((front, a, b), pick) in enumerate(zip(stages, picks)):
                layer_front = solver.layer_front(a, b, k[s], int(front.cap[pick]))
                layers += [table.strategies[j] for j in layer_front.backtrack(int(front.layout_class[pick]), int(front.index[pick]))]
            plan = Plan(world_size=self.world_size, layers=tuple(layers), pp=pp, pp_division=tuple(division),
                        pipeline=pipeline, chunks=c, global_batch=gb, embedding=embedding,
                        grad_sync_every_micro_batch=self.space.grad_sync_every_micro_batch)
            self.best_throughput = gb / time_s
            self.best = plan

    # -- reporting ---------------------------------------------------------------------------------------
    def left_out_summary(self) -> list[str]:
        return [f"{reason} ({len(items)} strategies)" if items else reason for reason, items in sorted(self.left_out.items())]

    def infeasible_error(self) -> PlanError:
        """Name the smallest budget that fits and the plan that fits it, or why nothing can run at all."""
        from galvatron_fx.passes.search.smallest_budget import smallest_budget
        found = smallest_budget(self)
        if found is None:
            reasons = "; ".join(self.left_out_summary()) or "no setting of the space is valid"
            return PlanError(f"no plan of this search space can run {len(self.types)} layers on {self.world_size} devices: {reasons}",
                             "change the world size, the batch options or the search space")
        need, _ = found
        plan = search(self.cost_model, self.world_size, need, self.space)
        return PlanError(f"no plan fits {format_bytes(self.budget)} per device; the smallest budget that fits is "
                         f"{format_bytes(need)} ({need} bytes), with pp={plan.pp} chunks={plan.chunks} "
                         f"layers {_describe(plan)} vtp={plan.embedding.vtp}",
                         f"raise the memory budget to at least {need} bytes, add devices, or widen the search space")


def _describe(plan: Plan) -> str:
    runs, out = [], []
    for strategy in plan.layers:
        if runs and runs[-1][0] == strategy:
            runs[-1][1] += 1
        else:
            runs.append([strategy, 1])
    for strategy, count in runs:
        out.append(f"{count}×[{strategy.short()}]")
    return " ".join(out)
