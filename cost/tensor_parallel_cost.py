"""What tensor and sequence parallelism cost a layer: the collectives of Megatron TP, Megatron-SP and Ulysses in
each pass, the sum of a sequence-parallel layer's partial gradients, and a layer's time where the profile
timed it in place with its collectives.

Every function takes the ``CostModel`` (``cm``: its hardware profile, precision and contention) and prices one
layer's share, as cost/data_parallel_cost.py does for data parallelism; ``CostModel.layer_cost`` and
cost/embedding_cost.py call them.
"""

from __future__ import annotations

from galvatron_fx.plan import LayerStrategy

from .layer_type_profile import LayerTypeProfile
from .memory import STATE_BYTES_PER_PARAM


def in_place_s(cm, part: LayerTypeProfile, tp: int, local: float, busy_share: float) -> tuple[float, float] | None:
    """(forward, backward) seconds of ``part`` on one of ``tp`` ranks (Megatron TP) at ``local`` samples per
    TP group, where the profile timed the lowered layer on every rank of this world at once
    (cost/in_place_profiler.py): compute, contention, collectives and the waits between them in one
    figure; None where it did not. The figure was taken with every rank computing; a pipeline's ranks
    compute for their ``busy_share`` only, so it is rescaled to the contention that share leaves, as
    ``CostModel.compute_s`` rescales one process's times."""
    times = part.in_place_times.get(cm.hardware.world_size, {}).get(tp) if cm.model.mode == "measured" else None
    if times is None:
        return None
    scale = cm.time_scale * cm.contention(busy_share) / cm.compute_slowdown
    return times[0](local, cm.seq) * scale, times[1](local, cm.seq) * scale


def tp_comm_s(
    cm, strategy: LayerStrategy, hidden_bytes: float, compute_s: float | None = None, backward: bool = False
) -> float:
    """TP/SP/Ulysses collectives of one direction (forward or ``backward``) of one layer, whose ``compute_s``
    of compute they split (None: as much as the profiler's skew probe computes between two). Megatron-SP's
    backward gathers its projections' inputs again (saved as sequence shards), unless it recomputes them."""
    tp, hw, cons = strategy.tp, cm.hardware, strategy.tp_consecutive
    if tp == 1:
        return 0.0
    regather = strategy.sp == "megatron" and backward and not strategy.ckpt
    calls = (2 if strategy.sp == "none" else 4) + (2 if regather else 0)
    # compute waits for each: the ranks must arrive together, and drift apart as they compute in between
    wait = hw.blocking_s(tp) if compute_s is None else hw.blocking_s(tp, compute_s / calls)
    if strategy.sp == "none":
        return 2 * (hw.collective_s("all_reduce", hidden_bytes, tp, cons) + wait)
    if strategy.sp == "megatron":
        gathers = 4 if regather else 2
        return (
            gathers * hw.collective_s("all_gather", hidden_bytes, tp, cons)
            + 2 * hw.collective_s("reduce_scatter", hidden_bytes, tp, cons)
            + calls * wait
        )
    return 4 * (hw.collective_s("all_to_all", hidden_bytes / tp, tp, cons) + wait)


def partial_grad_sum_s(cm, profile: LayerTypeProfile, strategy: LayerStrategy) -> float:
    """The all-reduce over the tp group, once per step after the gradient sync, of a sequence-parallel
    layer's gradients that each rank computed on its sequence shard (``runtime.data_parallel.PartialGradSum``):
    under Ulysses every weight's (a ZeRO layer's shard of them), under Megatron-SP its norms' and biases',
    whose few bytes cost the collective's latency."""
    if strategy.sp == "none" or strategy.tp == 1:
        return 0.0
    params = profile.param_count / (strategy.dp if strategy.dp_type != "ddp" else 1)
    nbytes = params * STATE_BYTES_PER_PARAM[cm.mixed_precision][1] if strategy.sp == "ulysses" else 1
    tp, consecutive = strategy.tp, strategy.tp_consecutive
    return cm.hardware.collective_s("all_reduce", nbytes, tp, consecutive) + cm.hardware.blocking_s(tp)
