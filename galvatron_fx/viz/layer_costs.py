"""A node's time and memory in the layer graph: the cost model's terms where there is one (``priced_cost``), or
figures from the graph's annotations at ``NOMINAL_FLOPS_PER_S`` (``annotated_cost``)."""

from __future__ import annotations

from galvatron_fx.cost.memory import model_state_bytes
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import PROLOGUE, Layer

NOMINAL_FLOPS_PER_S = 1e12


def batched_bytes(specs, scale: float) -> int:
    return int(sum(spec.nbytes * (scale if spec.batched else 1) for spec in specs))


def priced_cost(cost_model, plan: Plan, layer: Layer, bi: int | None, strategy) -> dict:
    """The cost model's terms of ``layer`` (body layer ``bi``, or the embedding or head when None) under
    ``strategy`` in ``plan``."""
    share = cost_model.busy_share(plan.pp, plan.chunks)
    if bi is not None:
        cost = cost_model.layer_cost(
            cost_model.layer_types[bi], strategy, plan.micro_batch, share, plan.defers_grad_sync
        )
    else:
        first = layer.kind == PROLOGUE
        cost = cost_model.embedding_cost(
            strategy,
            plan.devices_per_stage,
            plan.micro_batch,
            first_stage=first,
            last_stage=not first,
            busy_share=share,
            deferred_sync=plan.defers_grad_sync,
        )
    sync = cost.grad_sync_s * (plan.chunks if plan.grad_sync_every_micro_batch else 1)
    return dict(
        fwd_s=cost.fwd_s,
        bwd_s=cost.bwd_s,
        grad_sync_s=sync,
        model_state_bytes=int(cost.model_state_bytes),
        activation_bytes=int(cost.activation_bytes),
        peak_extra_bytes=int(cost.peak_extra_bytes),
    )


def annotated_cost(layer: Layer, strategy, scale: float, devices: int) -> dict:
    """Memory from the annotations (fp32 Adam states, sharded as the strategy says); times as FLOPs at the
    nominal rate, rescaled later to the plan's predicted iteration time when it has one."""
    if isinstance(strategy, LayerStrategy):
        tp, dp, dp_type, ckpt = strategy.tp, strategy.dp, strategy.dp_type, strategy.ckpt
        params = layer.stats.param_count / (1 if strategy.sp == "ulysses" else tp)
    else:
        tp, ckpt = strategy.vtp, False
        dp, dp_type = max(devices // tp, 1), "zero3" if strategy.embed_sdp else "ddp"
        params = layer.stats.param_count / tp
    per_device = scale / (tp * dp)
    fwd_s = layer.stats.fwd_flops * per_device / NOMINAL_FLOPS_PER_S
    bwd_s = layer.stats.bwd_flops * per_device / NOMINAL_FLOPS_PER_S + (fwd_s if ckpt else 0.0)
    saved = layer.stats.saved_activation_bytes * per_device
    kept = batched_bytes(layer.inputs, scale / dp) if ckpt else saved
    return dict(
        fwd_s=fwd_s,
        bwd_s=bwd_s,
        grad_sync_s=0.0,
        model_state_bytes=model_state_bytes(params, dp, dp_type, "fp32"),
        activation_bytes=int(kept),
        peak_extra_bytes=int(saved if ckpt else 0),
    )
