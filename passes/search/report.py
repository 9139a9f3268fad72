"""Why the searched plan beats the best uniform plan (one strategy for every layer): ``explain``.

requires: a searched Plan with its prediction, the CostModel and SearchSpace it was searched with.
ensures:  a few readable lines comparing throughput, iteration time terms and memory per stage.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from galvatron_fx.errors import PlanError
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.units import format_bytes, parse_bytes


def explain(plan, cost_model, memory_budget: int | str, space: SearchSpace) -> str:
    """Compare ``plan`` with the best uniform plan of the same space under the same budget (bytes, or a string
    such as "36GB")."""
    from galvatron_fx.passes.search.engine import search

    memory_budget = parse_bytes(memory_budget)

    try:
        uniform = search(cost_model, plan.world_size, memory_budget, dataclasses.replace(space, uniform=True))
    except PlanError as error:
        return f"explain: no uniform plan fits the budget ({error.cause}); only a mixed plan does."
    ours, theirs = plan.prediction, uniform.prediction
    lines = [
        f"explain: searched {ours.samples_per_s:.3f} samples/s vs best uniform {theirs.samples_per_s:.3f} "
        f"({ours.samples_per_s / theirs.samples_per_s:.3f}×).",
        f"  best uniform: pp {uniform.pp}, {uniform.chunks} micro-batches, every layer [{uniform.layers[0].short()}], "
        f"vtp {uniform.embedding.vtp}; peak memory {format_bytes(max(theirs.memory_bytes_per_stage))}.",
    ]
    mix = Counter(layer.short() for layer in plan.layers)
    lines.append(
        "  searched: pp {}, {} micro-batches, layers {}; peak memory {}.".format(
            plan.pp,
            plan.chunks,
            ", ".join(f"{n}×[{s}]" for s, n in mix.most_common()),
            format_bytes(max(ours.memory_bytes_per_stage)),
        )
    )
    if len(mix) > 1:
        lines.append(
            f"  Mixing strategies uses the memory a uniform plan leaves idle under the {format_bytes(memory_budget)} "
            f"budget: the faster strategy runs where it fits, the leaner one where it must."
        )
    if (plan.pp, plan.chunks) != (uniform.pp, uniform.chunks):
        lines.append(
            "  The pipeline setting differs too: the per-layer choice made another pp/micro-batch split pay off."
        )
    lines += _grid_lines(plan, cost_model)
    lines.append(
        f"  Iteration time {ours.iteration_time_s * 1e3:.1f} ms vs {theirs.iteration_time_s * 1e3:.1f} ms "
        f"(global batch {plan.global_batch} vs {uniform.global_batch})."
    )
    return "\n".join(lines)


def _grid_lines(plan, cost_model) -> list[str]:
    """Why grid layers: for each grid strategy of ``plan``, what one of its devices sends per layer and keeps of
    its activations, against 1D tensor parallelism of the same degree (cost/grid_tp.py)."""
    from galvatron_fx.cost.grid_tp import layer_shape, tp_terms
    from galvatron_fx.plan import LayerStrategy

    lines, seen = [], set()
    for index, strategy in enumerate(plan.layers):
        if strategy.tp_mode == "1d" or strategy in seen or not hasattr(cost_model, "model"):
            continue
        seen.add(strategy)
        profile = cost_model.model.layer(cost_model.layer_types[index])
        shape = layer_shape(cost_model, profile, plan.micro_batch / strategy.dp)
        grid, flat = tp_terms(strategy, shape), tp_terms(LayerStrategy(tp=strategy.tp, dp=strategy.dp), shape)
        lines.append(
            f"  [{strategy.short()}] sends {format_bytes(grid.volume_bytes)} per device per layer and micro-batch "
            f"(1D tp{strategy.tp}: {format_bytes(flat.volume_bytes)}) and keeps its activations in blocks of "
            f"1/{strategy.tp}: the grid's rows, columns and depth split what 1D replicates."
        )
    return lines
