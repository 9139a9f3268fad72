"""The annotated layer graph: one neutral description of a Program under a Plan, which every renderer draws.

``build_layer_graph(program, plan, cost_model=None)`` puts together, per layer: kind, type, module path,
strategy (and its colour), pipeline stage, FLOPs and bytes of one micro-batch, predicted time and memory on
one device, and the collectives its strategy implies; between layers: redistributions where layouts differ
and pipeline send/recv at stage cuts; per stage: forward/backward time, memory against the budget; and the
pipeline schedule as a timeline.

Predictions come from, in order of preference: the CostModel (``layer_cost``, ``embedding_cost``,
``redistribution_s``, ``p2p_s``, ``evaluate``); the plan's own ``prediction`` (stage memory; per-layer times
are its iteration time apportioned by FLOPs); the Program's annotations alone (times as FLOPs at a nominal
``NOMINAL_FLOPS_PER_S``, memory from parameter and saved-activation bytes). ``LayerGraph.source`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from galvatron_fx.cost.memory import InFlight
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan
from galvatron_fx.program import BLOCK, EPILOGUE, PROLOGUE, TRANSITION, Layer, Program

from .collectives import Collective, embedding_collectives, layer_collectives, redistribution_op
from .layer_costs import NOMINAL_FLOPS_PER_S as NOMINAL_FLOPS_PER_S  # also importable from here, as before
from .layer_costs import annotated_cost, batched_bytes, priced_cost
from .schedule import ScheduleOp, makespan_s, simulate_schedule

# Tableau 10: distinct hues that stay apart for colour-blind readers and on grey backgrounds
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
SOURCE_COST_MODEL, SOURCE_PLAN, SOURCE_ANNOTATIONS = "cost model", "plan prediction", "annotations"


@dataclass(frozen=True)
class LayerNode:
    """One layer of the Program as the plan runs it; bytes and FLOPs are per micro-batch, unsharded;
    times and memory are predictions for one device of its stage."""

    index: int  # into program.layers
    body_index: int | None  # into plan.layers; None for the prologue / epilogue
    kind: str
    layer_type: str
    module_path: str
    stage: int
    strategy: LayerStrategy | EmbeddingStrategy
    strategy_label: str
    color: str
    param_count: int
    param_bytes: int
    fwd_flops: int
    bwd_flops: int
    saved_activation_bytes: int
    boundary_bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    producers: tuple[int, ...]  # indices of the layers whose outputs it reads
    collectives: tuple[Collective, ...]
    fwd_s: float
    bwd_s: float
    grad_sync_s: float
    model_state_bytes: int
    activation_bytes: int  # kept for backward, one micro-batch
    peak_extra_bytes: int = 0  # transient: ZeRO-3 gathers, recomputation

    @property
    def name(self) -> str:
        return f"L{self.index} {self.module_path or self.kind}"

    @property
    def memory_bytes(self) -> int:
        """Model states plus one micro-batch's kept activations."""
        return self.model_state_bytes + self.activation_bytes


@dataclass(frozen=True)
class Redistribution:
    """Activations moved between body layers ``src`` and ``dst`` (layer indices) whose layouts differ."""

    src: int
    dst: int
    stage: int
    op: str  # forward activations: slice | all_gather | all_to_all
    backward_op: str  # their gradients, moved back the other way
    src_label: str
    dst_label: str
    bytes: int  # the activations live at the boundary, one micro-batch
    time_s: float | None  # forward + backward


@dataclass(frozen=True)
class Transfer:
    """Pipeline send/recv at a stage cut, after layer ``src`` (forward activations, backward gradients)."""

    src: int
    dst: int
    src_stage: int
    dst_stage: int
    tensors: tuple[str, ...]
    bytes: int  # one micro-batch
    time_s: float | None  # forward + backward


@dataclass(frozen=True)
class StageNode:
    """One pipeline stage on one of its devices."""

    stage: int
    ranks: tuple[int, ...]
    layer_indices: tuple[int, ...]
    fwd_s: float  # one micro-batch, with its redistributions and sends
    bwd_s: float
    grad_sync_s: float  # per iteration
    in_flight: int  # micro-batches whose activations it holds at once
    model_state_bytes: int
    activation_bytes: int  # all in-flight micro-batches
    peak_extra_bytes: int
    memory_bytes: int  # predicted peak (the cost model's or the plan's figure when there is one)


@dataclass(frozen=True)
class LayerGraph:
    """Everything the renderers draw; see the module docstring."""

    model_name: str
    world_size: int
    pp: int
    pipeline: str
    chunks: int
    global_batch: int
    micro_batch: int
    layers: tuple[LayerNode, ...]
    redistributions: tuple[Redistribution, ...]
    transfers: tuple[Transfer, ...]
    stages: tuple[StageNode, ...]
    schedule: tuple[ScheduleOp, ...]
    iteration_s: float
    samples_per_s: float
    memory_budget_bytes: int | None
    source: str
    legend: tuple[tuple[str, str], ...]  # (strategy label, colour), in order of first use

    @property
    def schedule_s(self) -> float:
        return makespan_s(self.schedule)


def strategy_label(strategy: LayerStrategy | EmbeddingStrategy, devices: int) -> str:
    """``LayerStrategy.short()``, or ``embed vtp2 dp2 sdp`` for the embedding and head."""
    if isinstance(strategy, LayerStrategy):
        return strategy.short()
    return " ".join(
        ["embed", f"vtp{strategy.vtp}", f"dp{max(devices // strategy.vtp, 1)}"]
        + (["vsp"] if strategy.vsp else [])
        + (["sdp"] if strategy.embed_sdp else [])
    )


def _hidden_bytes(layer: Layer, scale: float) -> int:
    """The hidden state TP collectives move: the layer's largest batched floating-point output."""
    outputs = [
        s for s in layer.boundary_out if s.name in layer.output_names and s.batched and s.dtype.is_floating_point
    ]
    return int(max((s.nbytes for s in outputs), default=0) * scale)


def _hidden_features(layer: Layer) -> int | None:
    """Features per token of the layer's largest batched floating-point output (its last dimension)."""
    outputs = [s for s in layer.boundary_out if s.batched and s.dtype.is_floating_point and s.shape]
    return max(outputs, key=lambda s: s.nbytes).shape[-1] if outputs else None


def _vocab_param_count(program: Program, layer: Layer) -> int:
    """Parameters with the vocabulary dimension (the largest dimension among the layer's matrices)."""
    params = [program.graph_module.get_parameter(name) for name in layer.param_names]
    matrices = [p for p in params if p.dim() == 2]
    vocab = max((max(p.shape) for p in matrices), default=0)
    return sum(p.numel() for p in matrices if vocab in p.shape)


def build_layer_graph(
    program: Program, plan: Plan, cost_model=None, memory_budget_bytes: int | None = None
) -> LayerGraph:
    """The annotated layer graph of ``program`` under ``plan`` (see the module docstring).

    requires: ``plan.layers`` covers ``program.body`` (raises PlanError otherwise); a cost model, if given,
              profiled for this model and ``plan.world_size`` devices.
    ensures:  every layer, stage cut and layout change of the plan appears once; times in seconds, bytes per
              device unless stated; nothing of ``program`` or ``plan`` is modified.
    """
    plan.check_fits(len(program.body), plan.world_size)
    mb, devices = plan.micro_batch, plan.devices_per_stage
    scale = mb / program.batch_size
    precision = getattr(cost_model, "mixed_precision", "fp32")
    act_scale = getattr(cost_model, "activation_scale", 1.0)
    hardware = getattr(cost_model, "hardware", None)
    body_index = {layer.index: i for i, layer in enumerate(program.body)}
    producer = {name: layer.index for layer in program.layers for name in layer.output_names}
    colors: dict[str, str] = {}

    nodes = []
    for layer in program.layers:
        bi = body_index.get(layer.index)
        if layer.kind in (BLOCK, TRANSITION):
            strategy, stage = plan.layers[bi], plan.stage_of_layer(bi)
        else:
            strategy, stage = plan.embedding, 0 if layer.kind == PROLOGUE else plan.pp - 1
        label = strategy_label(strategy, devices)
        colors.setdefault(label, PALETTE[len(colors) % len(PALETTE)])
        hidden = _hidden_bytes(layer if layer.kind != EPILOGUE else program.body[-1], scale) * act_scale
        if isinstance(strategy, LayerStrategy):
            comms = layer_collectives(
                strategy,
                hidden,
                layer.stats.param_count,
                mixed_precision=precision,
                hardware=hardware,
                hidden_features=_hidden_features(layer),
            )
        else:
            comms = embedding_collectives(
                strategy,
                devices,
                layer.kind,
                hidden,
                layer.stats.param_count,
                _vocab_param_count(program, layer),
                mixed_precision=precision,
                hardware=hardware,
            )
        cost = (
            priced_cost(cost_model, plan, layer, bi, strategy)
            if cost_model
            else annotated_cost(layer, strategy, scale, devices)
        )
        nodes.append(
            LayerNode(
                index=layer.index,
                body_index=bi,
                kind=layer.kind,
                layer_type=layer.layer_type,
                module_path=layer.module_path,
                stage=stage,
                strategy=strategy,
                strategy_label=label,
                color=colors[label],
                param_count=layer.stats.param_count,
                param_bytes=layer.stats.param_bytes,
                fwd_flops=int(layer.stats.fwd_flops * scale),
                bwd_flops=int(layer.stats.bwd_flops * scale),
                saved_activation_bytes=int(layer.stats.saved_activation_bytes * scale),
                boundary_bytes=batched_bytes(layer.boundary_out, scale),
                inputs=tuple(layer.input_names),
                outputs=tuple(layer.output_names),
                producers=tuple(
                    sorted({producer[n] for n in layer.input_names if n in producer and producer[n] != layer.index})
                ),
                collectives=tuple(comms),
                **cost,
            )
        )

    redistributions, transfers = _boundaries(program, plan, cost_model, nodes, scale * act_scale)
    if cost_model is None:
        nodes = _calibrate(nodes, plan, redistributions, transfers)
    stages = _stages(plan, nodes, redistributions, transfers, cost_model)
    fwd, bwd = [s.fwd_s for s in stages], [s.bwd_s for s in stages]
    schedule = tuple(simulate_schedule(plan.pipeline, plan.chunks, fwd, bwd, [s.grad_sync_s for s in stages]))
    if cost_model is not None:
        prediction = cost_model.evaluate(plan)
        iteration_s, source = prediction.iteration_time_s, SOURCE_COST_MODEL
    elif plan.prediction is not None:
        iteration_s, source = plan.prediction.iteration_time_s, SOURCE_PLAN
    else:
        iteration_s, source = makespan_s(schedule), SOURCE_ANNOTATIONS
    if memory_budget_bytes is None:
        memory_budget_bytes = (
            plan.provenance.get("memory_budget_bytes") or getattr(hardware, "memory_bytes", None) or None
        )
    return LayerGraph(
        model_name=program.model_name or plan.provenance.get("model") or "model",
        world_size=plan.world_size,
        pp=plan.pp,
        pipeline=plan.pipeline,
        chunks=plan.chunks,
        global_batch=plan.global_batch,
        micro_batch=mb,
        layers=tuple(nodes),
        redistributions=tuple(redistributions),
        transfers=tuple(transfers),
        stages=tuple(stages),
        schedule=schedule,
        iteration_s=iteration_s,
        samples_per_s=plan.global_batch / iteration_s if iteration_s > 0 else float("inf"),
        memory_budget_bytes=int(memory_budget_bytes) if memory_budget_bytes else None,
        source=source,
        legend=tuple(colors.items()),
    )


def _boundaries(program: Program, plan: Plan, cost_model, nodes: list[LayerNode], scale: float):
    """Redistributions inside stages and send/recv at stage cuts, between consecutive body layers."""
    body = program.body
    redistributions, transfers = [], []
    for bi in range(len(body)):
        stage = plan.stage_of_layer(bi)
        cut_bytes = batched_bytes([s for s in body[bi].boundary_out if s.batched], scale)
        if bi + 1 < len(body) and plan.stage_of_layer(bi + 1) == stage:
            before, after = plan.layers[bi], plan.layers[bi + 1]
            op = redistribution_op(before, after)
            if op is not None:
                time_s = cost_model.redistribution_s(before, after, bi + 1, plan.micro_batch) if cost_model else None
                redistributions.append(
                    Redistribution(
                        body[bi].index,
                        body[bi + 1].index,
                        stage,
                        op,
                        redistribution_op(after, before),
                        before.short(),
                        after.short(),
                        cut_bytes,
                        time_s,
                    )
                )
        elif bi + 1 < len(body):
            time_s = (
                cost_model.p2p_s(stage, plan.pp, plan.devices_per_stage, plan.micro_batch, bi) if cost_model else None
            )
            transfers.append(
                Transfer(
                    body[bi].index,
                    body[bi + 1].index,
                    stage,
                    stage + 1,
                    tuple(s.name for s in body[bi].boundary_out),
                    cut_bytes,
                    time_s,
                )
            )
    return redistributions, transfers


def _calibrate(nodes: list[LayerNode], plan: Plan, redistributions, transfers) -> list[LayerNode]:
    """Without a cost model: rescale the FLOP-proportional times so the schedule lasts the plan's predicted
    iteration time (kept at the nominal rate when the plan has no prediction)."""
    if plan.prediction is None:
        return nodes
    stages = _stages(plan, nodes, redistributions, transfers, None)
    unit_s = makespan_s(
        simulate_schedule(plan.pipeline, plan.chunks, [s.fwd_s for s in stages], [s.bwd_s for s in stages])
    )
    factor = plan.prediction.iteration_time_s / unit_s if unit_s > 0 else 1.0
    return [replace(n, fwd_s=n.fwd_s * factor, bwd_s=n.bwd_s * factor) for n in nodes]


def _stages(plan: Plan, nodes: list[LayerNode], redistributions, transfers, cost_model) -> list[StageNode]:
    stages = []
    predicted_memory = cost_model.evaluate(plan).memory_bytes_per_stage if cost_model is not None else ()
    for stage in range(plan.pp):
        members = [n for n in nodes if n.stage == stage]
        moves = [r.time_s or 0.0 for r in redistributions if r.stage == stage]
        moves += [t.time_s or 0.0 for t in transfers if t.src_stage == stage]
        in_flight = InFlight.of(plan.pipeline, plan.pp, stage, plan.chunks).first
        states = sum(n.model_state_bytes for n in members)
        activations = in_flight * sum(n.activation_bytes for n in members)
        peak = max((n.peak_extra_bytes for n in members), default=0)
        memory = states + activations + peak
        totals = (
            predicted_memory
            if cost_model is not None
            else (plan.prediction.memory_bytes_per_stage if plan.prediction else ())
        )
        if stage < len(totals):
            # the prediction's figure (phase-aware, cost/memory.py) is the total; the parts only say how it splits
            total = totals[stage]
            factor = total / memory if memory else 0.0
            states, activations, peak, memory = (
                int(states * factor),
                int(activations * factor),
                int(peak * factor),
                total,
            )
        start = stage * plan.devices_per_stage
        stages.append(
            StageNode(
                stage=stage,
                ranks=tuple(range(start, start + plan.devices_per_stage)),
                layer_indices=tuple(n.index for n in members),
                fwd_s=sum(n.fwd_s for n in members) + sum(moves) / 2,
                bwd_s=sum(n.bwd_s for n in members) + sum(moves) / 2,
                grad_sync_s=sum(n.grad_sync_s for n in members),
                in_flight=in_flight,
                model_state_bytes=states,
                activation_bytes=activations,
                peak_extra_bytes=peak,
                memory_bytes=int(memory),
            )
        )
    return stages
