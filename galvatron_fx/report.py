"""Text tables for Programs (and, later, plans)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .passes.search.report import explain
from .plan_sources import uniform_plan
from .units import format_bytes

if TYPE_CHECKING:
    from .program import Program

MB = 1e6


def layer_table(program: "Program") -> str:
    """The layer table: index, type, parameters, forward GFLOPs, saved and boundary MB per sample."""
    per_sample = 1.0 / program.batch_size
    header = ("#", "kind", "type", "module", "params", "fwd GFLOPs", "saved MB/sample", "boundary MB/sample")
    rows = []
    for layer in program.layers:
        boundary = sum(t.nbytes / (program.batch_size if t.batched else 1) for t in layer.boundary_out)
        rows.append(
            (
                str(layer.index),
                layer.kind,
                layer.layer_type,
                layer.module_path or "-",
                f"{layer.stats.param_count:,}",
                f"{layer.stats.fwd_flops * per_sample / 1e9:.4f}",
                f"{layer.stats.saved_activation_bytes * per_sample / MB:.3f}",
                f"{boundary / MB:.3f}",
            )
        )
    total_params = sum(p.numel() for _, p in program.named_parameters())
    title = (
        f"{program.model_name}: {len(program.layers)} layers ({len(program.body)} body, "
        f"{len(program.layer_types())} body types), {total_params:,} parameters, "
        f"captured at batch {program.batch_size}"
    )
    return title + "\n" + format_table(header, rows)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if _numeric(str(c)) else str(c).ljust(w) for c, w in zip(cells, widths)
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _numeric(cell: str) -> bool:
    return cell.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def plan_table(plan, cost_model=None, layer_types: list[str] | None = None) -> str:
    """A plan as text: one row per run of consecutive body layers with the same strategy and stage, then one
    row per stage with its predicted peak memory and the memory the search budgeted for it (when the plan
    has a prediction or a cost model is given), then the predicted time."""
    types = layer_types or (list(cost_model.layer_types) if cost_model is not None else None)
    runs: list[list[int]] = []
    for i, strategy in enumerate(plan.layers):
        if (
            runs
            and plan.layers[runs[-1][-1]] == strategy
            and plan.stage_of_layer(runs[-1][-1]) == plan.stage_of_layer(i)
            and (types is None or types[runs[-1][-1]] == types[i])
        ):
            runs[-1].append(i)
        else:
            runs.append([i])
    rows = []
    for run in runs:
        strategy = plan.layers[run[0]]
        span = f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}"
        time_s = ""
        if cost_model is not None:
            cost = cost_model.layer_cost(
                types[run[0]], strategy, plan.micro_batch, cost_model.busy_share(plan.pp, plan.chunks)
            )
            time_s = f"{(cost.fwd_s + cost.bwd_s) * 1e3:.3f}"
        rows.append((span, types[run[0]] if types else "-", str(plan.stage_of_layer(run[0])), strategy.short(), time_s))
    header = ("layers", "type", "stage", "strategy", "fwd+bwd ms/micro-batch/layer")
    lines = [
        f"plan for {plan.world_size} devices: pp {plan.pp} ({plan.pipeline}, division {list(plan.pp_division)}), "
        f"global batch {plan.global_batch} in {plan.chunks} micro-batches of {plan.micro_batch}; "
        f"embedding/head vtp {plan.embedding.vtp}{' vsp' if plan.embedding.vsp else ''}"
        f"{' zero3' if plan.embedding.embed_sdp else ''}",
        format_table(header, rows),
    ]
    prediction = plan.prediction or (cost_model.evaluate(plan) if cost_model is not None else None)
    if prediction is not None:
        # budgeted: the additive bound the search holds against the memory budget (at least the predicted peak)
        stage_rows = [
            (str(s), str(plan.pp_division[s]), f"{memory / 2**30:.3f}", f"{bound / 2**30:.3f}")
            for s, (memory, bound) in enumerate(
                zip(prediction.memory_bytes_per_stage, prediction.budgeted_bytes_per_stage)
            )
        ]
        lines += [
            "",
            format_table(("stage", "layers", "predicted peak GiB/device", "budgeted GiB/device"), stage_rows),
            "",
            f"predicted: {prediction.iteration_time_s * 1e3:.3f} ms per iteration, {prediction.samples_per_s:.2f} "
            "samples/s",
        ]
    return "\n".join(lines)


def why_this_plan(plan, cost_model, memory_budget_bytes: int, space=None) -> str:
    """Why ``plan`` won: against the best uniform plan of the ``space`` it was searched in (when it was
    searched), and what plain data parallelism (every layer DP, no pipeline) would need under the budget."""
    lines = [explain(plan, cost_model, memory_budget_bytes, space)] if space is not None else []
    plain = uniform_plan().resolve(len(plan.layers), plan.world_size, plan.global_batch)
    prediction = cost_model.evaluate(plain)
    need = max(prediction.memory_bytes_per_stage)
    verdict = "does not fit" if need > memory_budget_bytes else "fits"
    lines.append(
        f"plain data parallelism would need {format_bytes(need)} per device: it {verdict} the "
        f"{format_bytes(memory_budget_bytes)} budget ({prediction.samples_per_s:.3f} samples/s predicted)."
    )
    return "\n".join(lines)
