"""What data parallelism costs a layer: DDP's all-reduce, FSDP2's (ZeRO-2/3) gathers and reduce-scatters, how
much of them stays visible next to compute, the optimizer step, and the model states each keeps.

Every function takes the ``CostModel`` (``cm``: its hardware profile, precision and overlap) and prices one
layer's (or the embedding's and head's) share; ``CostModel.layer_cost``, ``cost/grid_tp.py`` and
``cost/embedding_cost.py`` call them alike.
"""

from __future__ import annotations

from galvatron_fx.plan import LayerStrategy

from .hardware import BLOCKING_PROBE_COMPUTE_S
from .memory import COMPUTE_BYTES_PER_PARAM, GRAD_BUCKET_CAP_BYTES, STATE_BYTES_PER_PARAM, model_state_split


def dp_comm(
    cm,
    params: float,
    dp: int,
    dp_type: str,
    consecutive: bool,
    compute_s: tuple[float, float] = (BLOCKING_PROBE_COMPUTE_S, BLOCKING_PROBE_COMPUTE_S),
    deferred_sync: bool = False,
) -> tuple[float, float, float]:
    """(ZeRO-3 parameter gather per pass, gradient sync per step, transient bytes in backward) on ``params``
    parameters, next to ``compute_s`` = (forward, backward) seconds of the layer's compute. The transient bytes
    are FSDP2's: the layer's unsharded gradients and the previous layer's, whose reduce-scatter is in flight
    (ZeRO-2 and -3), and with ZeRO-3 the layer's gathered parameters and the next layer's, prefetched. With
    ``deferred_sync`` the unsharded gradients are held from the step's first backward to its last (model
    states, ``model_states``): a backward then adds only the shards the reduce-scatters write."""
    if dp == 1 or params <= 0:
        return 0.0, 0.0, 0.0
    grad_b, weight_b = STATE_BYTES_PER_PARAM[cm.mixed_precision][1], COMPUTE_BYTES_PER_PARAM[cm.mixed_precision]
    hw = cm.hardware
    grads, weights = params * grad_b, params * weight_b  # fp32 gradients reduced; bf16 parameters gathered
    new_grads = grads / dp if deferred_sync else grads  # what a backward allocates for the reduce-scatter
    if dp_type == "ddp":  # the layer's share of a bucket's all-reduce: one latency per bucket
        fit = hw.fit("all_reduce", dp, consecutive)
        return 0.0, fit.latency_s * min(1.0, grads / GRAD_BUCKET_CAP_BYTES) + grads / fit.bandwidth_Bps, 0.0
    scatter_s = hw.collective_s("reduce_scatter", grads, dp, consecutive)
    gather_s = hw.collective_s("all_gather", weights, dp, consecutive)
    if dp_type == "zero2":  # reduce-scatter, then the all-gather of the updated parameters
        gather, sync, calls, transient = 0.0, scatter_s + gather_s, (0, 2), 2 * new_grads
    else:
        gather, sync, calls, transient = gather_s, scatter_s, (1, 1), 2 * (weights + new_grads)
    if not hw.comm_streams:
        gather, sync = _in_place(cm, dp_type, params * 4, dp, gather, sync, calls, compute_s)
    return gather, sync, transient


def _in_place(
    cm,
    dp_type: str,
    fp32_bytes: float,
    dp: int,
    gather_s: float,
    sync_s: float,
    calls: tuple[int, int],
    compute_s: tuple[float, float],
) -> tuple[float, float]:
    """(gather, sync) of a ZeRO unit whose collectives are waited for in place (no communication streams):
    FSDP2's measured cost of a unit of this size (every collective, copy and wait of a step), split as the
    collectives' times, or without that measurement the collectives' own times; and each of the ``calls``
    (gather, sync) collectives pays the ranks' arrival skew after the layer's forward (gather) or backward
    (sync) compute."""
    skew = [cm.hardware.blocking_s(dp, c) for c in compute_s]
    unit_s = cm.hardware.sharded_unit_s(dp_type, fp32_bytes, dp)
    if unit_s is not None:  # the probe's ranks arrive together (nothing computes between): add the skew
        collectives_s = (2 if dp_type == "zero3" else 0) * gather_s + sync_s  # ZeRO-3 gathers in both passes
        gather_s, sync_s = gather_s * unit_s / collectives_s, sync_s * unit_s / collectives_s
    return gather_s + calls[0] * skew[0], sync_s + calls[1] * skew[1]


def visible_s(cm, comm_s: float, compute_s: float, dp_type: str) -> float:
    """Visible cost of data-parallel communication next to ``compute_s``. DDP's all-reduce is started as
    asynchronous work from backward hooks, so it overlaps on every device; FSDP2 (ZeRO) overlaps its collectives
    by running them on their own streams, which only GPUs have: on CPU it waits for each in place
    (``_in_place`` priced that)."""
    if dp_type != "ddp" and not cm.hardware.comm_streams:
        return comm_s
    return overlapped_s(cm, comm_s, compute_s)


def overlapped_s(cm, comm_s: float, compute_s: float) -> float:
    """Visible cost of ``comm_s`` overlapped with ``compute_s``: the excess, plus the slowdown of the overlap."""
    hidden = min(comm_s, compute_s)
    return (comm_s - hidden) + hidden * (cm.overlap - 1.0)


def optimizer_s(cm, params: float, dp: int, dp_type: str) -> float:
    """One optimizer step over the parameters this device updates (a ZeRO shard, or all of them)."""
    updated = params / dp if dp_type in ("zero2", "zero3") else params
    return updated * cm.hardware.optimizer_s_per_param


def ddp_drift_s(cm, strategy: LayerStrategy, own_s: tuple[float, float]) -> float:
    """A DDP layer without TP runs no collective the ranks wait for until the gradient all-reduce after the
    step's backward, so they drift apart while it computes (ranks sharing cores; the hardware's skew growth):
    the slowest rank's lag, which the others wait out at that all-reduce, grows by the drift over this layer's
    forward and backward ``own_s``, for every micro-batch."""
    if strategy.tp > 1 or strategy.dp == 1 or strategy.dp_type != "ddp":
        return 0.0
    hw = cm.hardware
    return hw.blocking_s(strategy.dp, BLOCKING_PROBE_COMPUTE_S + sum(own_s)) - hw.blocking_s(strategy.dp)


def model_states(
    cm, params: float, dp: int, dp_type: str, largest_param: float, deferred_sync: bool
) -> tuple[int, int, int]:
    """(model state bytes, gradient bytes, accumulate bytes) of ``params`` parameters on a ``dp``-way
    ``dp_type`` group, the largest of them ``largest_param`` elements (``LayerCost``'s fields)."""
    states, grads = model_state_split(params, dp, dp_type, cm.mixed_precision)
    grad_b, weight_b = STATE_BYTES_PER_PARAM[cm.mixed_precision][1], STATE_BYTES_PER_PARAM[cm.mixed_precision][0]
    if deferred_sync and dp > 1 and dp_type in ("zero2", "zero3"):
        # FSDP2 with gradient sync paused accumulates each layer's unsharded fp32 gradient from the step's
        # first backward to its last, which reduce-scatters it into the shard: until then the layer's gradient
        # bytes are the unsharded ones (an over-count in the optimizer step, by then gone)
        unsharded = int(params * grad_b)
        states, grads = states + unsharded - grads, unsharded
    # autograd computes a weight's gradient whole, then adds it to a stored one: DDP's, and ZeRO's unsharded
    # ones held over a step's micro-batches; otherwise ZeRO's are new in every backward (in the transient)
    accumulates = dp_type == "ddp" or (deferred_sync and dp > 1)
    accumulate = largest_param * grad_b if accumulates else 0.0
    if dp_type == "ddp" and dp > 1:  # DDP's gradient buckets persist: no phase of the step is without them
        grads = 0
    if dp_type == "zero2" and dp > 1:  # the shard stays besides the gathered parameters during a step
        states += int(params * weight_b / dp)
    return states, grads, int(accumulate)
