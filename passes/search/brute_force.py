"""Brute force: every plan of a search space, scored by CostModel.evaluate. Only for small problems — it is
the reference the dynamic programme is tested against.

requires: a CostModel; a space small enough to enumerate (strategies ** layers plans per setting).
ensures:  ``brute_force_search`` returns (best samples/s, best plan) over exactly the plans ``search``
          considers, or (0.0, None) when none fits.
"""

from __future__ import annotations

import itertools
from typing import Iterator

from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import Plan


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to split ``total`` layers into ``parts`` non-empty contiguous stages."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def all_plans(cost_model, world_size: int, space: SearchSpace) -> Iterator[Plan]:
    """Every valid plan of ``space`` (layers a cost model cannot run a strategy on are left out)."""
    types = list(cost_model.layer_types)
    L = len(types)
    for pp in space.pp_degrees(world_size, L):
        devices = world_size // pp
        for mode in space.default_dp_types():
            yield from _plans(
                cost_model,
                world_size,
                space,
                pp,
                space.layer_strategies(devices, mode),
                space.embedding_strategies(devices, mode),
            )


def _plans(cost_model, world_size, space, pp, strategies, embeddings):
    types = list(cost_model.layer_types)
    L = len(types)
    per_layer = [[s for s in strategies if cost_model.unsupported_reason(t, s) is None] for t in types]
    for gb in space.global_batches():
        for c in space.chunk_counts(gb):
            if (gb // c) % (world_size // pp):  # not every device of a stage gets its own samples (Plan refuses it)
                continue
            choices = (
                [[s] * L for s in per_layer[0] if all(s in u for u in per_layer)]
                if space.uniform
                else itertools.product(*per_layer)
            )
            choices = list(choices)
            for pipeline, every in itertools.product(space.pipelines, space.grad_sync_options(c)):
                for division in compositions(L, pp):
                    for embedding in embeddings:
                        for layers in choices:
                            yield Plan(
                                world_size=world_size,
                                layers=tuple(layers),
                                pp=pp,
                                pp_division=division,
                                pipeline=pipeline,
                                chunks=c,
                                global_batch=gb,
                                embedding=embedding,
                                grad_sync_every_micro_batch=every,
                            )


def brute_force_search(
    cost_model, world_size: int, memory_budget: int, space: SearchSpace
) -> tuple[float, Plan | None]:
    """The highest samples/s over all plans whose every stage fits ``memory_budget`` bytes as the search
    budgets them (``Prediction.budgeted_bytes``)."""
    best, best_plan = 0.0, None
    for plan in all_plans(cost_model, world_size, space):
        prediction = cost_model.evaluate(plan)
        if prediction.budgeted_bytes <= memory_budget and prediction.samples_per_s > best:
            best, best_plan = prediction.samples_per_s, plan
    return best, best_plan
