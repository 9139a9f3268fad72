"""Search the layerwise hybrid-parallel plan with the highest throughput under a per-device memory budget.

``search(cost_model, world_size, "36GB", space)`` returns the Plan maximising samples/s under
``cost_model.evaluate`` — the cost contract's formula, rebuilt from its per-layer terms:

1. settings (pp, global batch, chunks, pipeline, default dp type) ordered by an upper bound on samples/s
   (the Lagrangian bound of fitting every layer into pp memory budgets, search.bounds); a setting whose
   in-flight counts are nowhere lower than another's of the same (pp, batch, chunks) is skipped (same
   time, no less memory: GPipe next to 1F1B);
2. a seeded plan (search.seed_plan, priced by evaluate) for every setting that might win, so that the exact
   pass starts from a near-optimal incumbent; then the exact pass, cut as soon as the bound cannot win,
   and skipping each setting whose tighter bound (per stage, its own budget and in-flight count, over the
   best division) cannot;
3. per (devices per stage, micro-batch): one cost-model query per (layer type, strategy); strategies
   another of the same layout beats in every term are left out; identical layer runs share fronts;
4. per stage: exact Pareto fronts over (memory, time, gradient sync) — search.front — whose points are
   dropped as soon as the rest of the plan cannot beat the incumbent (search.bounds);
5. per setting: branch-and-bound over pp_division and the embedding strategy, with the exact pipeline
   formula over the fronts — search_stage.

Memory: a stage fits when its additive bound (``Prediction.memory_bound_bytes_per_stage``: every layer in its
worst phase, the largest transient on top) fits the budget; the predicted peak never exceeds that bound.

Data-parallel types follow Galvatron's ``default_dp_type``: each setting fixes one of ddp/zero2 for every
layer that is not ZeRO-3 and for the embedding/head replicas (unless ``embed_sdp``); ZeRO-3 is free per
layer. Both modes are searched, so the optimum is exact over that space (the brute force walks the same).

requires: a cost model following the cost contract (``search.cost_contract.CostContract``).
ensures:  the returned plan is the optimum of evaluate() over the space (ties broken arbitrarily), its
          ``prediction`` is evaluate(plan), its provenance names model, cluster, budget, version and
          ``search_time_s``; strategies a layer cannot run are left out with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from galvatron_fx.cost.memory import InFlight
from galvatron_fx.errors import PlanError
from galvatron_fx.parallel_dims import end_layout
from galvatron_fx.passes.search.bounds import RestBound, StageBound, division_bound_s
from galvatron_fx.passes.search.cost_contract import CostContract
from galvatron_fx.passes.search.front import build_cost_table, folded, subset
from galvatron_fx.passes.search.seed_plan import seed_plan
from galvatron_fx.passes.search.setting import Setting
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.passes.search.stage_solver import EmbeddingPart, StageSolver
from galvatron_fx.plan import Plan
from galvatron_fx.units import format_bytes, parse_bytes

Progress = Callable[[int, int, float], None]  # (settings done, settings total, best samples/s so far)


def search(
    cost_model: CostContract,
    world_size: int,
    memory_budget: "int | str",
    space: SearchSpace | None = None,
    *,
    progress: Progress | None = None,
    provenance: dict[str, Any] | None = None,
) -> Plan:
    """The plan with the highest predicted samples/s whose every stage fits ``memory_budget`` bytes per device.

    Raises PlanError when nothing fits, naming the smallest budget that does and its plan."""
    started = time.perf_counter()
    engine = SearchEngine(cost_model, world_size, parse_bytes(memory_budget), space or SearchSpace(), progress)
    plan = engine.run()
    if plan is None:
        raise engine.infeasible_error()
    from galvatron_fx import __version__

    record = {
        "model": None,
        "cluster": None,
        **(provenance or {}),
        "memory_budget_bytes": engine.budget,
        "version": __version__,
        "search_time_s": round(time.perf_counter() - started, 4),
        "search_settings_visited": engine.visited,
        "left_out": engine.left_out_summary(),
    }
    return Plan(**{**_fields(plan), "prediction": cost_model.evaluate(plan), "provenance": record})


def _fields(plan: Plan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in plan.__dataclass_fields__}


class SearchEngine:
    """State of one search: caches, incumbent, reasons for left-out strategies."""

    def __init__(self, cost_model, world_size: int, budget: int, space: SearchSpace, progress: Progress | None):
        self.cost_model, self.world_size, self.budget, self.space, self.progress = (
            cost_model,
            world_size,
            budget,
            space,
            progress,
        )
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

            probe = (
                LayerStrategy(tp=1, dp=self.world_size),
                LayerStrategy(tp=2, dp=self.world_size // 2, sp="megatron"),
            )
        for i in range(1, len(self.types)):
            value = self.cost_model.redistribution_s(*probe, i, 1) if probe else 0.0
            key = (self.types[i - 1], self.types[i], value)
            first.setdefault(key, i)
            group.append(key)
        return tuple(group), first

    # -- settings ----------------------------------------------------------------------------------------
    def settings(self) -> list[Setting]:
        """Every setting of the space, the most promising (highest upper bound on samples/s) first."""
        out = []
        L = len(self.types)
        pps = self.space.pp_degrees(self.world_size, L)
        if not pps:
            self.left_out.setdefault(
                f"no pipeline degree fits world size {self.world_size} and {L} layers (max_pp {self.space.max_pp})",
                set(),
            )
        for pp, dp_mode in ((p, m) for p in pps for m in self.space.default_dp_types()):
            devices = self.world_size // pp
            strategies = self.space.layer_strategies(devices, dp_mode)
            for global_batch in self.space.global_batches():
                for chunks in self.space.chunk_counts(global_batch):
                    micro_batch = global_batch // chunks
                    if micro_batch % devices:
                        self.left_out.setdefault(
                            f"micro-batch {micro_batch} does not give each of the {devices} devices of "
                            "a stage its own samples",
                            set(),
                        ).add(f"pp{pp} batch {global_batch} chunks {chunks}")
                        continue
                    candidates = {}
                    for pipeline in self.space.pipelines:
                        in_flight = tuple(self.cost_model.in_flight(pipeline, pp, s, chunks) for s in range(pp))
                        candidates.setdefault(
                            in_flight, pipeline
                        )  # both schedules keep the same micro-batches: one search
                    for in_flight, pipeline in candidates.items():
                        if any(
                            other != in_flight and all(a <= b for a, b in zip(other, in_flight)) for other in candidates
                        ):
                            continue  # fewer micro-batches in flight everywhere: same time, no more memory
                        for every in self.space.grad_sync_options(chunks):
                            setting = Setting(
                                0.0, pp, devices, global_batch, chunks, pipeline, in_flight, dp_mode, every
                            )
                            table = self.table(self.table_key(setting), strategies)  # every dp divides the batch
                            out.append(
                                dataclasses.replace(
                                    setting, upper_bound=global_batch / self.time_lower_bound(table, setting)
                                )
                            )
        out.sort(key=lambda setting: -setting.upper_bound)
        return out

    def folded_table(self, table, chunks: int, syncs: int):
        """``table`` with X := chunks·X + syncs·G (one stage: the iteration time is exactly that sum)."""
        key = (id(table), chunks, syncs)
        if key not in self.folded_tables:
            self.folded_tables[key] = (table, folded(table, chunks, syncs))
        return self.folded_tables[key][1]

    def table_key(self, setting: Setting) -> tuple:
        """(devices per stage, micro-batch, dp mode, busy share, deferred gradient sync): what a setting's
        layer costs depend on."""
        return (
            setting.devices,
            setting.micro_batch,
            setting.dp_mode,
            self.cost_model.busy_share(setting.pp, setting.chunks),
            setting.defers_grad_sync,
        )

    def table(self, key: tuple, strategies):
        if key not in self.tables:
            _, mb, _, share, deferred = key
            self.tables[key] = build_cost_table(self.cost_model, strategies, mb, self.left_out, share, deferred)
        return self.tables[key]

    def time_lower_bound(self, table, setting: Setting) -> float:
        """No plan of this setting is faster: T >= (1 + (chunks-1)/pp)·Σ_s X_s, and the layers' Σ X is at least
        the Lagrangian bound of fitting them all into pp budgets (search.bounds); with one stage T = chunks·X + G
        exactly."""
        if not all(table.useful[t].any() for t in self.types):
            return np.inf
        pp, chunks = setting.pp, setting.chunks
        weight = 1.0
        if pp == 1:
            table = self.folded_table(table, chunks, setting.syncs)
        else:
            weight = 1 + (chunks - 1) / pp
        least_in_flight = InFlight.least(setting.in_flight)
        key = (id(table), least_in_flight)
        if key not in self.rest_bounds:
            caps = np.array([max(int(table.peak[t][table.useful[t]].max()) for t in self.types)])
            self.rest_bounds[key] = RestBound(table, self.types, least_in_flight, caps, per_cap=False)
        bound = self.rest_bounds[key]
        syncs = setting.syncs
        emb_s, emb_bytes = np.inf, np.inf
        for embedding in self.space.embedding_strategies(setting.devices, setting.dp_mode):
            parts = self.parts(setting, embedding)
            emb_s = min(emb_s, sum(chunks * p.x_s + syncs * p.g_s if pp == 1 else p.x_s for p in parts))
            emb_bytes = min(emb_bytes, sum(p.memory(least_in_flight) for p in parts))
        rest = bound.total[0]
        m_avail = pp * self.budget - emb_bytes
        layers_s = float(
            np.max(rest - bound.lam * m_avail - 1e-9 * (np.abs(rest) + bound.lam * (2 * abs(m_avail) + 1)))
        )
        return weight * (max(layers_s, 0.0) + emb_s) + 1e-30

    def stage_time_lower_bound(self, setting: Setting) -> float:
        """A tighter bound than ``time_lower_bound``, for the settings the exact pass reaches: with stage ``s``
        over layers ``[a, b)`` taking at least the Lagrangian bound of fitting them into its own budget with
        its own in-flight count (search.bounds ``StageBound``) plus its embedding/head part,
        T >= Σ_s X_s + (chunks − 1)·max_s X_s over the best division; with one stage T = chunks·X + G exactly."""
        table = self.tables[self.table_key(setting)]
        if not all(table.useful[t].any() for t in self.types):
            return np.inf
        pp, chunks, syncs = setting.pp, setting.chunks, setting.syncs
        if pp == 1:
            table = self.folded_table(table, chunks, syncs)
        best, spans_s = np.inf, {}  # middle stages have no part: their spans repeat across embeddings
        for embedding in self.space.embedding_strategies(setting.devices, setting.dp_mode):
            spans = []
            for s, part in enumerate(self.parts(setting, embedding)):
                in_flight = setting.in_flight[s]
                key = (in_flight, part.memory(in_flight) + part.peak_bytes)
                if key not in spans_s:
                    if (id(table), in_flight) not in self.stage_bounds:
                        self.stage_bounds[id(table), in_flight] = StageBound(table, self.types, in_flight)
                    spans_s[key] = self.stage_bounds[id(table), in_flight].spans_s(self.budget - key[1])
                spans.append(spans_s[key] + (chunks * part.x_s + syncs * part.g_s if pp == 1 else part.x_s))
            best = min(best, division_bound_s(spans, 1 if pp == 1 else chunks))
        return best * (1 - 1e-9) + 1e-30

    def parts(self, setting: Setting, embedding) -> list[EmbeddingPart]:
        """The embedding's and head's share of each stage of ``setting`` (``EmbeddingPart``; none in the middle)."""
        pp, devices, micro_batch = setting.pp, setting.devices, setting.micro_batch
        out, share, deferred = [], self.cost_model.busy_share(pp, setting.chunks), setting.defers_grad_sync
        for s in range(pp):
            key = (devices, micro_batch, embedding, s == 0, s == pp - 1, setting.dp_mode, share, deferred)
            if key not in self.embedding_parts:
                cost = self.cost_model.embedding_cost(
                    embedding,
                    devices,
                    micro_batch,
                    first_stage=s == 0,
                    last_stage=s == pp - 1,
                    busy_share=share,
                    deferred_sync=deferred,
                )
                self.embedding_parts[key] = EmbeddingPart(
                    cost.fwd_s + cost.bwd_s,
                    cost.grad_sync_s,
                    cost.model_state_bytes,
                    cost.activation_bytes,
                    cost.transient_bound_bytes,
                    cost.grad_bytes,
                    cost.optimizer_temp_bytes,
                    end_layout(embedding, devices) if s in (0, pp - 1) else None,  # middle stages share fronts
                )
            out.append(self.embedding_parts[key])
        return out

    # -- the search --------------------------------------------------------------------------------------
    def beats_incumbent(self, samples_per_s: float) -> bool:
        return samples_per_s > self.best_throughput * (1 + 1e-12)

    def run(self) -> Plan | None:
        settings = self.settings()
        # First a cheap seeded plan for every setting that might win: the exact pass then prunes with the best.
        for setting in settings:
            if not self.beats_incumbent(setting.upper_bound):
                break
            self.solve_setting(setting, exact=False)
        for done, setting in enumerate(settings):
            if not self.beats_incumbent(setting.upper_bound):
                break  # sorted by upper bound: nothing later can win
            self.visited += 1
            if self.beats_incumbent(setting.global_batch / self.stage_time_lower_bound(setting)):
                self.solve_setting(setting)
            if self.progress:
                self.progress(done + 1, len(settings), self.best_throughput)
        if self.progress:
            self.progress(len(settings), len(settings), self.best_throughput)
        return self.best

    def solve_setting(self, setting: Setting, exact: bool = True) -> None:
        key = self.table_key(setting)
        full = self.tables[key]
        if not self.space.uniform:
            self.solve_table(full, setting, exact)
            return
        for j in range(len(full.strategies)):  # one strategy for every layer: a table of one
            if all(full.allowed[t][j] for t in self.types):
                uniform_key = (*key, j)
                if uniform_key not in self.uniform_tables:
                    self.uniform_tables[uniform_key] = subset(full, [j])
                self.solve_table(self.uniform_tables[uniform_key], setting, exact)

    def solver(self, table, setting: Setting) -> StageSolver:
        key = self._solver_key(table, setting)
        if key not in self.solvers:
            embeddings = self.space.embedding_strategies(setting.devices, setting.dp_mode)
            self.solvers[key] = StageSolver(
                self,
                table,
                setting.pp,
                setting.micro_batch,
                setting.chunks,
                setting.in_flight,
                [self.parts(setting, e) for e in embeddings],
                setting.syncs,
            )
        return self.solvers[key]

    @staticmethod
    def _solver_key(table, setting: Setting) -> tuple:
        return (id(table), setting.pp, setting.global_batch, setting.chunks, setting.in_flight, setting.syncs)

    def solve_table(self, table, setting: Setting, exact: bool = True) -> None:
        embeddings = self.space.embedding_strategies(setting.devices, setting.dp_mode)
        solver = self.solver(table, setting)
        if not exact:
            seeded = seed_plan(self, table, solver, setting, embeddings, lambda e: self.parts(setting, e))
            if seeded is not None and seeded[1].samples_per_s > self.best_throughput:
                self.best, self.best_throughput = seeded[0], seeded[1].samples_per_s
            return
        self.solvers.pop(self._solver_key(table, setting), None)  # solved once
        ranked = sorted(embeddings, key=lambda e: sum(p.x_s for p in self.parts(setting, e)))
        for embedding in ranked:
            bound_s = setting.global_batch / self.best_throughput if self.best_throughput > 0 else np.inf
            found = solver.best_division(self.parts(setting, embedding), bound_s)
            if found is None:
                continue
            time_s, division, (stages, picks) = found
            layers, parts = [], self.parts(setting, embedding)
            for s, ((front, a, b), pick) in enumerate(zip(stages, picks)):
                layer_front = solver.layer_front(a, b, setting.in_flight[s], int(front.cap[pick]), parts[s].layout)
                layers += [
                    table.strategies[j]
                    for j in layer_front.backtrack(int(front.layout_class[pick]), int(front.index[pick]))
                ]
            self.best = Plan(
                world_size=self.world_size,
                layers=tuple(layers),
                pp=setting.pp,
                pp_division=tuple(division),
                pipeline=setting.pipeline,
                chunks=setting.chunks,
                global_batch=setting.global_batch,
                embedding=embedding,
                grad_sync_every_micro_batch=setting.sync_every_micro_batch,
            )
            self.best_throughput = setting.global_batch / time_s

    # -- reporting ---------------------------------------------------------------------------------------
    def left_out_summary(self) -> list[str]:
        return [
            f"{reason} ({len(items)} strategies)" if items else reason
            for reason, items in sorted(self.left_out.items())
        ]

    def infeasible_error(self) -> PlanError:
        """Name the smallest budget that fits and the plan that fits it, or why nothing can run at all."""
        from galvatron_fx.passes.search.smallest_budget import smallest_budget

        found = smallest_budget(self)
        if found is None:
            reasons = "; ".join(self.left_out_summary()) or "no setting of the space is valid"
            return PlanError(
                f"no plan of this search space can run {len(self.types)} layers on {self.world_size} devices: "
                f"{reasons}",
                "change the world size, the batch options or the search space",
            )
        need, _ = found
        plan = search(self.cost_model, self.world_size, need, self.space)
        return PlanError(
            f"no plan fits {format_bytes(self.budget)} per device; the smallest budget that fits is "
            f"{format_bytes(need)} ({need} bytes), with pp={plan.pp} chunks={plan.chunks} "
            f"layers {_describe(plan)} vtp={plan.embedding.vtp}",
            f"raise the memory budget to at least {need} bytes, add devices, or widen the search space",
        )


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
