"""The embedding and the head in the cost model (the model's "ends"): what a stage's prologue (the embedding, on the
first stage) and epilogue (the head and the loss, on the last stage) compute, move and keep on one device.

``CostModel.embedding_cost`` prices them with ``ends_cost`` here, as ``CostModel.layer_cost`` prices a grid layer
with ``cost/grid_tp.py``: every function takes the cost model as its first argument and reads from it the model
profile, the hardware, the training dtype and the terms it shares with body layers (``compute_s``, and
cost/tensor_parallel_cost.py's and cost/data_parallel_cost.py's functions). ``ends_cost`` returns the terms
before the model states (``EndsCost``); the cost model adds those (``CostModel._with_states``), as for any layer.

Read ``ends_cost`` first: its docstring says how vocab TP (``vtp``) and vsp split the two parts. The functions after
it price one term each: vsp's own small collectives (``_vsp_comm_s``), the activations the parts keep
(``embedding_activation_per_sample``, with the profile's one-stage figure ``ONE_STAGE_ACTIVATION``), the step's
blocking collectives after the gradient sync (``_step_collectives_s``), and the activation-gradient working set of
the parts' backward (``_part_working_bytes``; ``head_working_bytes``, the head's alone, which ``CostModel.evaluate``
places at the start of a stage's backward). The hidden states' moves between the ends' layout and the body layers'
are not priced here (``CostModel.redistribution_s``, from ``evaluate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from galvatron_fx.parallel_dims import data_split, end_layout, uses_vsp
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy

from .data_parallel_cost import dp_comm, optimizer_s, visible_s
from .layer_type_profile import LayerTypeProfile
from .layouts import move_key, move_plan, move_s
from .memory import STATE_BYTES_PER_PARAM
from .tensor_parallel_cost import in_place_s, tp_comm_s

# ModelProfile.extra key: vocab-TP degree → activation bytes per sample of the embedding and head on one stage
ONE_STAGE_ACTIVATION = "one_stage_embedding_head_activation_bytes_per_sample"


@dataclass(frozen=True)
class EndsCost:
    """The embedding's and head's ``LayerCost`` terms before their model states (``CostModel._with_states`` adds
    them from ``params`` stored per rank on a ``dp``-way ``dp_type`` group, the largest gradient computed whole
    ``largest_param`` elements)."""

    fwd_s: float
    bwd_s: float
    grad_sync_s: float
    activation_bytes: int
    peak_extra_bytes: int
    params: float
    dp: int
    dp_type: str
    largest_param: float


def ends_cost(
    cost_model,
    embedding: EmbeddingStrategy,
    devices: int,
    micro_batch: int,
    first_stage: bool,
    last_stage: bool,
    busy_share: float = 1.0,
    deferred_sync: bool = False,
) -> EndsCost | None:
    """The prologue (embedding, on the first stage) and/or epilogue (head and loss, on the last stage); None on a
    stage with neither.

    Vocab TP ``vtp`` splits the vocabulary-sized weights and the head's compute; the embedding's output
    and the head's input gradient are all-reduced over the ``vtp`` group. The ``devices // vtp`` replicas
    use ``embedding.data_parallel_type``.

    Under vsp (``vtp > 1``, as lowered by ``passes.lower.graph.sequence_parallel``, mode "vsp") the weights
    stay whole, replicated over the stage (``devices`` replicas synchronise them), and each rank of a vtp
    group computes the group's samples on ``1 / vtp`` of the sequence: the compute, activations and
    working set of the data split (vtp 1). Its collectives are small: the token ids move to that layout
    (first stage), the labels to the group's samples, and the loss's target count and value are
    all-reduced over the group (last stage). The hidden states move between that layout and the body
    layers' at the boundaries (``evaluate``: ``end_layout``), not here.
    """
    cm = cost_model
    vtp, vsp = embedding.vtp, uses_vsp(embedding)
    split = 1 if vsp else vtp  # how many ways the vocabulary-sized weights and the head's compute are split
    dp = devices if vsp else max(devices // vtp, 1)  # replicas of the weights
    local = micro_batch / max(devices // vtp, 1)  # samples of a rank's layout (vsp: on 1 / vtp of the sequence)
    work = micro_batch / devices if vsp else local  # samples' worth of compute on a rank, split ``split`` ways
    # A sharded embedding/head stays gathered from forward to backward (as FSDP2's root does): it gathers
    # once per step and keeps its gradients and states sharded, which is ZeRO-2's price
    kind = "zero2" if embedding.data_parallel_type == "zero3" else embedding.data_parallel_type
    hidden_bytes = cm.model.prologue.boundary_bytes_per_sample * local * cm.activation_scale
    strategy = LayerStrategy(tp=split, dp=dp, dp_type=kind)
    half_comm = tp_comm_s(cm, strategy, hidden_bytes) / 2  # one collective, not Megatron's two
    parts = [part for part, wanted in ((cm.model.prologue, first_stage), (cm.model.epilogue, last_stage)) if wanted]
    if not parts:
        return None
    own = [in_place_s(cm, part, 1, work, busy_share) if split == 1 else None for part in parts]
    casts = [cm.cast_params(part, split, dp, kind) for part in parts]
    own = [
        times
        or (
            cm.compute_s(part, "fwd", work, split, busy_share, cast),
            cm.compute_s(part, "bwd", work, split, busy_share, cast),
        )
        for part, times, cast in zip(parts, own, casts)
    ]
    fwd_compute = sum(fwd for fwd, _ in own)
    bwd_parts = [bwd for _, bwd in own]
    bwd_compute = sum(bwd_parts)
    vsp_s = _vsp_comm_s(cm, embedding, devices, micro_batch, first_stage, last_stage) if vsp else 0.0
    # vtp splits the vocabulary-sized weights; a tied embedding/head weight lives once on a stage with both
    tied = cm.model.tied_param_count if first_stage and last_stage else 0
    params = (
        sum(part.param_count - part.vocab_param_count + part.vocab_param_count / split for part in parts) - tied / split
    )
    largest = max(part.largest_param_count / (split if part.vocab_param_count else 1) for part in parts)
    # the parts of a stage synchronise as one unit (FSDP2 shards them together; DDP: one share of a bucket),
    # once the first part's backward (the last to run) is done: like a layer's, it hides behind that one
    gather_s, sync_s, transient = dp_comm(cm, params, dp, kind, split == 1, deferred_sync=deferred_sync)
    activation = embedding_activation_per_sample(cm, parts, vtp, vsp) * local
    if last_stage:  # the head's matmul casts its weight; the embedding's lookup casts nothing
        head = cm.model.epilogue
        head_params = head.param_count - head.vocab_param_count + head.vocab_param_count / split
        activation += cm.autocast_cast_bytes(head_params, dp, kind)
    transient += _part_working_bytes(cm, parts, vtp, vsp, local)
    return EndsCost(
        fwd_compute + vsp_s + (half_comm if first_stage else 0.0) + visible_s(cm, gather_s, fwd_compute, kind),
        bwd_compute + (half_comm if last_stage else 0.0) + visible_s(cm, gather_s, bwd_compute, kind),
        visible_s(cm, sync_s, bwd_parts[0], kind)
        + optimizer_s(cm, params, dp, kind)
        + _step_collectives_s(cm, split, pipelined=not (first_stage and last_stage)),
        int(activation),
        int(transient),
        params,
        dp,
        kind,
        largest,
    )


def _vsp_comm_s(
    cost_model, embedding: EmbeddingStrategy, devices: int, micro_batch: int, first_stage: bool, last_stage: bool
) -> float:
    """The embedding's and head's own collectives of one micro-batch under vsp (forward only): the token ids
    (int64) moved from the data split to the group's samples on its slice of the sequence, the labels to
    the group's samples (whole sequences: their shift is computed whole), and two scalar all-reduces over
    the vtp group (the loss's target count and value)."""
    ids_bytes = micro_batch * cost_model.seq * 8
    split, ends = data_split(devices), end_layout(embedding, devices)
    seconds = 0.0
    if first_stage:
        seconds += move_s(cost_model.hardware, move_plan(move_key(split), move_key(ends)), ids_bytes)
    if last_stage:
        whole = dataclasses.replace(ends, sp="none")
        seconds += move_s(cost_model.hardware, move_plan(move_key(split), move_key(whole)), ids_bytes)
        hw = cost_model.hardware
        seconds += 2 * (hw.collective_s("all_reduce", 4, embedding.vtp) + hw.blocking_s(embedding.vtp))
    return seconds


def embedding_activation_per_sample(cost_model, parts: list[LayerTypeProfile], vtp: int, vsp: bool) -> float:
    """Activation bytes per sample (training dtype) the embedding and head ``parts`` of one stage keep on
    one of ``vtp`` ranks. A stage holding both uses the profile's figure measured that way where it has
    one (``ModelProfile.extra[ONE_STAGE_ACTIVATION]``: Galvatron's ``other_memory_pp_off``): each part's
    own figure there was measured on the first or last stage of a pipeline, with what a cut adds on
    either side, and their sum exceeds the one-stage measurement (by 68 MiB per sample at vtp 2 for
    LLaMA-2-7B)."""
    table = cost_model.model.extra.get(ONE_STAGE_ACTIVATION) if len(parts) == 2 else None
    if table:
        per_sample = LayerTypeProfile._lookup({int(k): int(v) for k, v in table.items()}, vtp)
    else:
        per_sample = sum(part.activation_per_sample(vtp, vsp) for part in parts)
    return per_sample * cost_model.activation_scale


def _step_collectives_s(cost_model, vtp: int, pipelined: bool) -> float:
    """Collectives a stage holding the embedding or the head runs once per step after its gradient sync,
    each waiting for its slowest peer: two scalar all-reduces over the world, the global gradient norm's
    (every step computes it, clipped or not: runtime/grad_norm.py) and the loss's (every rank returns the
    global mean), and in a pipeline the all-reduce of a tied embedding/head weight's gradient between
    the first and the last stage. They count with the gradient sync (with ``grad_sync_every_micro_batch``,
    once per micro-batch: a small over-count kept so that the search and ``evaluate`` agree)."""
    hw, world = cost_model.hardware, cost_model.hardware.world_size
    seconds = 2 * (hw.collective_s("all_reduce", 4, world) + hw.blocking_s(world))
    if pipelined and cost_model.model.tied_param_count:
        grad_bytes = cost_model.model.tied_param_count / vtp * STATE_BYTES_PER_PARAM[cost_model.mixed_precision][1]
        seconds += hw.collective_s("all_reduce", grad_bytes, 2) + hw.blocking_s(2)
    return seconds


def _part_working_bytes(cost_model, parts, vtp: int, vsp: bool, local: float) -> float:
    """The largest activation-gradient working set among the embedding's and the head's backward (they
    run at different times) on one of ``vtp`` ranks at ``local`` samples."""
    return max(part.grad_working_per_sample(vtp, vsp) for part in parts) * local * cost_model.activation_scale


def head_working_bytes(cost_model, embedding: EmbeddingStrategy, devices: int, micro_batch: int) -> float:
    """The head's activation-gradient working set (its backward is a stage's first)."""
    local = micro_batch / max(devices // embedding.vtp, 1)
    return _part_working_bytes(
        cost_model, [cost_model.model.epilogue], embedding.vtp, embedding.vsp and embedding.vtp > 1, local
    )
