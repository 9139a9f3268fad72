"""A whole plan's time and memory from its layers' costs (``CostModel.layer_cost``, ``embedding_cost``): the
stages' busy time per micro-batch with the moves between layers and stages, the pipeline formula, and the
memory walk of each stage in forward order (the formula in passes/search/cost_contract.py).

Every function takes the ``CostModel`` (``cm``); ``CostModel.evaluate``, ``redistribution_s`` and ``p2p_s`` are
these.
"""

from __future__ import annotations

import dataclasses

from galvatron_fx.errors import PlanError, ProfileError
from galvatron_fx.parallel_dims import end_layout
from galvatron_fx.plan import LayerStrategy, Plan, Prediction

from .embedding_cost import head_working_bytes
from .layer_cost import LayerCost
from .layouts import layout_of, move_key, move_plan, move_s


def evaluate_plan(cm, plan: Plan) -> Prediction:
    """Iteration time, samples/s and peak bytes per stage of ``plan`` (formula in the cost contract)."""
    if len(plan.layers) != len(cm.layer_types):
        raise PlanError(
            f"the plan has {len(plan.layers)} layer strategies, the model profile {len(cm.layer_types)} body layers",
            "use a plan made for this model",
        )
    if plan.world_size != cm.hardware.world_size:
        raise ProfileError(
            f"{cm.hardware.source or 'hardware profile'}: key world_size is {cm.hardware.world_size}, "
            f"but the plan is for {plan.world_size} devices",
            f"use a hardware profile or Cluster preset of {plan.world_size} devices",
        )
    mb, chunks, pp = plan.micro_batch, plan.chunks, plan.pp
    share = cm.busy_share(pp, chunks)
    busy, sync, memory, bound = [], [], [], []
    for stage in range(pp):
        indices = list(plan.stage_layers(stage))
        deferred = plan.defers_grad_sync
        body = [cm.layer_cost(cm.layer_types[i], plan.layers[i], mb, share, deferred) for i in indices]
        part = cm.embedding_cost(
            plan.embedding,
            plan.devices_per_stage,
            mb,
            first_stage=stage == 0,
            last_stage=stage == pp - 1,
            busy_share=share,
            deferred_sync=deferred,
        )
        costs = body + [part]
        x = sum(c.fwd_s + c.bwd_s for c in costs)
        x += sum(redistribution_s(cm, plan.layers[i - 1], plan.layers[i], i, mb) for i in indices[1:])
        ends = end_layout(plan.embedding, plan.devices_per_stage)  # the data split, or vsp's layout
        if stage == 0:
            x += redistribution_s(cm, ends, plan.layers[0], 0, mb)
        if stage == pp - 1:
            x += redistribution_s(cm, plan.layers[-1], ends, len(plan.layers), mb)
        if stage < pp - 1:
            x += p2p_s(cm, stage, pp, plan.devices_per_stage, mb, indices[-1])
        g = sum(c.grad_sync_s for c in costs) * (chunks if plan.grad_sync_every_micro_batch else 1)
        held = cm.in_flight(plan.pipeline, pp, stage, chunks)
        head_working = head_working_bytes(cm, plan.embedding, plan.devices_per_stage, mb)
        memory.append(held.stage_peak(forward_order(body, part, stage == 0, stage == pp - 1, head_working)))
        bound.append(
            sum(
                int(held.layer_bytes(c.model_state_bytes, c.activation_bytes, c.grad_bytes, c.optimizer_temp_bytes))
                for c in costs
            )
            + max(c.transient_bound_bytes for c in costs)
        )
        busy.append(x)
        sync.append(g)
    iteration_s = sum(busy) + (chunks - 1) * max(busy) + max(sync)
    return Prediction(
        iteration_s,
        plan.global_batch / iteration_s if iteration_s > 0 else float("inf"),
        tuple(memory),
        tuple(int(b) for b in bound),
    )


def forward_order(
    body: list[LayerCost], part: LayerCost, first_stage: bool, last_stage: bool, head_working_bytes: float
) -> list[LayerCost]:
    """A stage's costs in forward order, for the memory walk: the embedding before the body layers, the head
    after them. A stage with both holds them as one unit: its states and activations count with the head,
    whose backward runs first with its own activation gradients, and its transient (the unit's gradient
    sync) after the embedding's backward, the last of the step."""
    if first_stage and last_stage:
        return [
            LayerCost(0.0, 0.0, 0.0, 0, 0, part.peak_extra_bytes),
            *body,
            dataclasses.replace(part, peak_extra_bytes=int(head_working_bytes)),
        ]
    return ([part] if first_stage else []) + body + ([part] if last_stage else [])


def redistribution_s(cm, before: LayerStrategy, after: LayerStrategy, boundary_index: int, micro_batch: int) -> float:
    """Moving the activations live between body layers ``boundary_index - 1`` and ``boundary_index`` from
    ``before``'s layout to ``after``'s (forward), and their gradients back (backward). 0 when equal.
    Boundary 0 is the embedding's output entering the first body layer, boundary L (the number of body
    layers) the last layer's output entering the head: both parts lay activations out by
    ``end_layout`` (the data split, or under vsp the vtp group's samples split along the sequence); the
    embedding's outputs are the values that cross the first cut."""
    if layout_of(before) == layout_of(after):
        return 0.0
    per_sample = cm.model.cut_bytes_per_sample[max(boundary_index - 1, 0)]
    key = (move_key(before), move_key(after), per_sample, micro_batch)
    if key not in cm.redistribution_cache:
        total = per_sample * micro_batch * cm.activation_scale
        cm.redistribution_cache[key] = sum(
            move_s(cm.hardware, move_plan(a, b), total) for a, b in ((key[0], key[1]), (key[1], key[0]))
        )
    return cm.redistribution_cache[key]


def p2p_s(cm, stage: int, plan_pp: int, devices_per_stage: int, micro_batch: int, cut_after_body_index: int) -> float:
    """Send/recv of one micro-batch's activations at the cut after ``cut_after_body_index`` (forward) and of
    their gradients (backward); each of the stage's devices sends ``1 / devices_per_stage`` of them. The
    receiver waits for its sender, so each transfer also pays a pair's arrival skew."""
    nbytes = cm.model.cut_bytes_per_sample[cut_after_body_index] * micro_batch * cm.activation_scale / devices_per_stage
    return 2 * (cm.hardware.p2p_s(nbytes, plan_pp) + cm.hardware.blocking_s(2))
