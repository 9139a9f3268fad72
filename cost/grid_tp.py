"""Grid tensor parallelism in the cost model: what a 2D, 2.5D or 3D layer computes, moves and keeps on one device.

A grid layer's ``tp = P`` ranks (``LayerStrategy.grid_shape``) split its FLOPs ``P`` ways, as 1D TP does: the
profile's compute formula at the replica's samples over ``P`` (``CostModel.compute_s``). What differs is the
communication, by group, and what a rank keeps. ``T`` is the tokens of one micro-batch on a data-parallel replica
(``micro_batch / dp`` samples × sequence length), ``h`` the hidden size (the profile's boundary bytes per token),
``b`` bytes per activation element (training dtype), ``W`` the layer's parameters, ``A`` the saved-activation
bytes of the whole replica's micro-batch on one device (the profile's tp-1 figure).

2D (``P = q²``) and 2.5D (``P = d·q²``), as ``passes/lower/graph/grid_parallel.py`` lowers them: the samples
are split over the ``d·q`` rows, the features over the ``q`` ranks of a row (Megatron's column/row-parallel
pairs on the row, activations between them feature-split); each rank stores ``1/q`` of its row's shard of every
parameter, all-gathered over the column before use (``grid_param``). With ``T_r = T / (d·q)``, per layer:
- row (``q`` consecutive ranks), forward: all-gather of ``[T_r, h]`` before each of the ``ROW_GATHERS``
  column-parallel groups, reduce-scatter of ``[T_r, h]`` after each of the ``ROW_SCATTERS`` row-parallel
  projections, ``NORMS × NORM_REDUCTIONS`` all-reduces of ``[T_r, 1]`` norm statistics; backward the same counts
  with the all-gathers and reduce-scatters swapped, and the ``ROW_GATHERS`` all-gathers again (the projections
  saved their inputs as blocks: ``passes.lower.ops.regather``; a checkpointed layer's recomputation keeps them
  whole instead). Bytes moved per rank: ``4·(q−1)/q · T_r·h·b`` forward, ``6·(q−1)/q · T_r·h·b`` backward.
  Between layers the activations stay split along the features (``cost.layouts``: no move between layers of
  one grid, a redistribution to and from any other layout).
- column (``q`` ranks ``q`` apart): forward the all-gather of ``W / q`` parameters (``PARAM_TENSORS`` calls; in
  autocast's dtype, as the projections use them), again in backward (saved as blocks, like the inputs) or in the
  recomputation of a checkpointed layer; backward the reduce-scatter of their ``W / q`` gradients (in the
  parameters' dtype).
- depth (``d`` ranks ``q²`` apart, 2.5D): backward the all-reduce of the ``W / q²`` block gradients.
- memory: ``W / q²`` parameters (2.5D: one copy per depth layer) with their gradients and optimizer states, then
  sharded over ``dp`` by ZeRO as usual; activations ``A / P`` from forward to backward, every gathered input and
  weight saved as its block (under bf16 autocast the blocks' casts, ``W / q²`` in bf16); while the layer
  computes, one gathered input ``[T_r, h]`` and its ``W / q`` weights (bf16 under autocast); a checkpointed
  layer's recomputation keeps its gathered inputs whole (``ROW_GATHERS × T_r·h·b·(1 − 1/q)`` more) until its
  backward is done.

3D (``P = q³``), as ``grid_parallel`` lowers it, which moves what Colossal-AI's published algorithm moves per
linear (Bian et al., "Maximizing Parallelism in Distributed Training for Huge Neural Networks", arXiv 2105.14450;
Colossal-AI's ``legacy/nn/layer/parallel_3d/_operation.py``: ``_Linear3D``, ``_Layernorm3D``): a linear ``X·A``
with ``X: [T, f_in]`` and ``A: [f_in, f_out]`` keeps ``X`` in blocks ``[T/q², f_in/q]`` and ``A`` in blocks of
``f_in·f_out/q³``; forward it all-gathers the input's samples over one group (``T·f_in/q²`` gathered) and the
weight over the column (``f_in·f_out/q²``), multiplies, and reduce-scatters the output's samples over another
(``T·f_out/q²``); backward it all-gathers the output gradient and reduce-scatters the input and weight gradients
over the same groups, and all-gathers the input and weight again (saved as blocks, ``passes.lower.ops.regather``;
not in a checkpointed layer, whose recomputation keeps them whole). The groups (``grid_groups``): a
column-parallel projection gathers over the pairs (ranks ``q`` apart) and scatters over the row (consecutive),
a row-parallel one the reverse; the column's ranks are ``q²`` apart. The layer's linears are a Transformer
block's (``transformer_linears``: ``h→3h``, ``h→h``, ``h→m``, ``m→h``, the MLP width ``m`` from the parameter
count). Norms all-reduce two statistics over the row each way. Between layers the activations are in the rows'
layout (``parallel_dims.activation_strategy``), split along the features, as 2D's are. Published per-device figures
(Colossal-AI's feature docs, ring algorithm): computation, parameters and activations ``O(1/q³)``, bandwidth
``O(6(q−1)/q³)``, latency ``O(6(q−1))``; for 2D ``O(1/q²)`` and ``O(6(q−1)/q)``, 2.5D ``O(1/(d·q²))`` and
``O(3(q−1)(d+1)/(d·q))``, 1D activations ``O(1)`` and bandwidth ``O(2(P−1)/P)``. The terms here are those
asymptotics with the constants of the algorithms as lowered.

Group placement: the grid sits on consecutive ranks, so a row is consecutive; in 2D and 2.5D a column is strided by
``q`` and a depth group by ``q²``, in 3D the pairs by ``q`` and the column by ``q²``. A hardware profile may hold
fits for such groups (``"<op>/<g>/stride<s>"``, measured by the hardware profiler); otherwise a group within a node
uses the consecutive fit of its size and one across nodes the strided fit (``group_fit``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from galvatron_fx.plan import LayerStrategy

from .data_parallel_cost import dp_comm, optimizer_s, visible_s
from .hardware import HardwareProfile, ring_volume_factor
from .memory import COMPUTE_BYTES_PER_PARAM, DTYPE_BYTES, STATE_BYTES_PER_PARAM

# a Transformer block as the grid lowering rewrites it: two column-parallel groups (attention's q/k/v, the MLP's
# up/gate) whose input is gathered once each, two row-parallel projections (attention's output, the MLP's down)
ROW_GATHERS = 2
ROW_SCATTERS = 2
NORMS = 2
NORM_REDUCTIONS = 2  # row statistics (mean and variance; their gradients in backward) per norm and direction
PARAM_TENSORS = 8  # grid_param nodes: the four projections' weights and biases (the norms' are whole and small)
STAT_BYTES = 4  # fp32 statistics


@dataclass(frozen=True)
class Collective:
    """``calls`` collectives ``op`` over groups of ``size`` ranks ``stride`` apart, moving ``nbytes`` in all (the
    hardware profile's convention: the gathered output, the reduce-scatter's input, the all-reduce's buffer);
    ``group`` names the grid's group (``row``, ``column``, ``depth``, or ``tp`` for 1D)."""

    op: str
    group: str
    size: int
    stride: int
    nbytes: float
    calls: int = 1

    @property
    def volume_bytes(self) -> float:
        """Bytes each rank sends under the ring algorithm."""
        return self.nbytes * ring_volume_factor(self.op, self.size)


@dataclass(frozen=True)
class LayerShape:
    """What pricing a layer's tensor parallelism needs: ``tokens`` of one micro-batch on a data-parallel replica,
    ``hidden`` features of the activations between layers, ``act_bytes`` per activation element (training
    dtype), ``params`` of the layer, ``activation_bytes``: saved-activation bytes of those tokens on one device."""

    tokens: float
    hidden: int
    act_bytes: float
    params: float
    activation_bytes: float

    @property
    def hidden_bytes(self) -> float:
        """The boundary activation ``[tokens, hidden]`` in bytes."""
        return self.tokens * self.hidden * self.act_bytes


@dataclass(frozen=True)
class TPTerms:
    """One layer's tensor-parallel terms on one rank: the collectives of its forward and backward (a checkpointed
    layer's backward without its recomputation), the parameters it stores (before ZeRO) and holds gathered while
    computing, the activation bytes one micro-batch keeps from forward to backward (``activation_bytes``), the
    largest input a projection gathers (``largest_gathered_bytes``, alive while it computes) and how much more the
    gathered inputs hold than their blocks (``gathered_input_bytes``: kept by a checkpointed layer's
    recomputation until its backward is done)."""

    forward: tuple[Collective, ...]
    backward: tuple[Collective, ...]
    stored_params: float
    gathered_params: float
    activation_bytes: float
    gathered_input_bytes: float = 0.0
    largest_gathered_bytes: float = 0.0

    @property
    def volume_bytes(self) -> float:
        """Bytes one rank sends in a forward and backward (ring algorithm)."""
        return sum(c.volume_bytes for c in self.forward + self.backward)


def transformer_linears(hidden: int, params: float) -> list[tuple[float, float]]:
    """``(f_in, f_out)`` of a Transformer block's linears: fused q/k/v ``h→3h``, output ``h→h``, MLP ``h→m`` and
    ``m→h`` with ``m = (W − 4h²) / 2h`` (4h·m parameters in the MLP, gated MLPs included as wider ones); a layer
    with fewer than ``4h²`` parameters is priced as one pair ``h→k→h`` holding them all."""
    h = float(hidden)
    if params >= 4 * h * h:
        m = (params - 4 * h * h) / (2 * h)
        return [(h, 3 * h), (h, h)] + ([(h, m), (m, h)] if m > 0 else [])
    k = params / (2 * h)
    return [(h, k), (k, h)]


def tp_terms(strategy: LayerStrategy, shape: LayerShape, mixed_precision: str = "fp32") -> TPTerms:
    """The terms of ``strategy``'s tensor parallelism for a layer of ``shape`` (see the module docstring): a grid
    ``tp_mode``, or 1D Megatron without sequence parallelism (2 all-reduces of ``[T, h]`` each way over ``tp``,
    activations not sharded here: the reference the orderings are checked against). A checkpointed strategy
    gathers nothing again in backward."""
    weight_b = COMPUTE_BYTES_PER_PARAM[mixed_precision]  # grid_param gathers the blocks in autocast's dtype
    grad_b = STATE_BYTES_PER_PARAM[mixed_precision][1]  # and sums their gradients in the parameters' dtype
    P, H, W = strategy.tp, shape.hidden_bytes, shape.params
    if strategy.tp_mode == "1d":
        if strategy.sp != "none":
            raise ValueError("tp_terms prices 1D tensor parallelism without sequence parallelism only")
        stride = 1 if strategy.tp_consecutive else strategy.dp
        ar = (Collective("all_reduce", "tp", P, stride, 2 * H, 2),) if P > 1 else ()
        return TPTerms(ar, ar, W / P, W / P, shape.activation_bytes)
    q, depth, cube = strategy.grid_shape
    if cube > 1:
        return _cube_terms(q, shape, weight_b, grad_b, strategy.ckpt)
    rows = depth * q
    H_row = H / rows
    stats = shape.tokens / rows * STAT_BYTES
    norms = NORMS * NORM_REDUCTIONS
    forward = [
        Collective("all_gather", "row", q, 1, ROW_GATHERS * H_row, ROW_GATHERS),
        Collective("reduce_scatter", "row", q, 1, ROW_SCATTERS * H_row, ROW_SCATTERS),
        Collective("all_reduce", "row", q, 1, norms * stats, norms),
        Collective("all_gather", "column", q, q, W / q * weight_b, PARAM_TENSORS),
    ]
    backward = [
        Collective("reduce_scatter", "row", q, 1, ROW_GATHERS * H_row, ROW_GATHERS),
        Collective("all_gather", "row", q, 1, ROW_SCATTERS * H_row, ROW_SCATTERS),
        Collective("all_reduce", "row", q, 1, norms * stats, norms),
        Collective("reduce_scatter", "column", q, q, W / q * grad_b, PARAM_TENSORS),
    ]
    if not strategy.ckpt:  # what forward gathered, gathered again from the saved blocks
        backward += [forward[0], forward[3]]
    if depth > 1:
        backward.append(Collective("all_reduce", "depth", depth, q * q, W / (q * q) * grad_b, PARAM_TENSORS))
    return TPTerms(
        tuple(forward),
        tuple(_merged(backward)),
        stored_params=W / (q * q),
        gathered_params=W / q,
        activation_bytes=shape.activation_bytes / P,
        gathered_input_bytes=ROW_GATHERS * H_row * (1 - 1 / q),
        largest_gathered_bytes=H_row,
    )


def _cube_terms(q: int, shape: LayerShape, weight_b: float, grad_b: float, ckpt: bool) -> TPTerms:
    """3D on ``q³`` ranks (Colossal-AI's ``_Linear3D`` per linear; see the module docstring)."""
    T, b, W = shape.tokens, shape.act_bytes, shape.params
    linears = transformer_linears(shape.hidden, W)
    weights = sum(f_in * f_out for f_in, f_out in linears)
    scale = W / weights if weights else 0.0  # the linears hold all of the layer's parameters
    forward: list[Collective] = []
    backward: list[Collective] = []
    gathered_inputs = 0.0
    for i, (f_in, f_out) in enumerate(linears):
        # column-parallel (even): samples gathered over the pairs, partial sums scattered over the row; the
        # row-parallel one after it the other way round (the layouts rotate and come back)
        (gather, in_stride), (scatter, out_stride) = (("pairs", q), ("row", 1))[:: 1 if i % 2 == 0 else -1]
        x, y, a = T * f_in / q**2 * b, T * f_out / q**2 * b, f_in * f_out * scale / q**2
        gathers = [
            Collective("all_gather", gather, q, in_stride, x),
            Collective("all_gather", "column", q, q * q, a * weight_b),
        ]
        forward += [*gathers, Collective("reduce_scatter", scatter, q, out_stride, y)]
        backward += [
            Collective("all_gather", scatter, q, out_stride, y),
            Collective("reduce_scatter", gather, q, in_stride, x),
            Collective("reduce_scatter", "column", q, q * q, a * grad_b),
        ]
        backward += [] if ckpt else gathers  # again, from the saved blocks
        gathered_inputs += x * (1 - 1 / q)  # kept whole by a checkpointed layer's recomputation
    rows_tokens = T / q**2
    norms = Collective("all_reduce", "row", q, 1, NORMS * rows_tokens * 2 * STAT_BYTES, NORMS)
    return TPTerms(
        tuple(_merged(forward + [norms])),
        tuple(_merged(backward + [norms])),
        stored_params=W / q**3,
        gathered_params=W / q**2,
        activation_bytes=shape.activation_bytes / q**3,
        gathered_input_bytes=gathered_inputs,
        largest_gathered_bytes=max(T * f_in / q**2 * b for f_in, _ in linears),
    )


def _merged(collectives: list[Collective]) -> list[Collective]:
    """Collectives of one op on one group shape summed into one entry (bytes and calls add up)."""
    out: dict[tuple, Collective] = {}
    for c in collectives:
        key = (c.op, c.group, c.size, c.stride)
        if key in out:
            old = out[key]
            c = dataclasses.replace(old, nbytes=old.nbytes + c.nbytes, calls=old.calls + c.calls)
        out[key] = c
    return list(out.values())


def group_fit(hardware: HardwareProfile, op: str, size: int, stride: int):
    """The fit of ``op`` over ``size`` ranks ``stride`` apart: measured for that shape where the profile has it,
    else the consecutive fit of ``size`` ranks when the group lies within a node (its span ``stride·(size − 1)``
    short of ``devices_per_node``), the strided fit (across nodes) otherwise."""
    key = f"{op}/{size}/stride{stride}"
    if key in hardware.collectives:
        return hardware.collectives[key]
    if stride == 1:
        return hardware.fit(op, size, True)
    within_node = stride * (size - 1) < hardware.devices_per_node
    return hardware.fit(op, size, within_node)


def collectives_s(hardware: HardwareProfile, collectives, compute_s: float | None = None) -> float:
    """Seconds of ``collectives`` in sequence: each call a latency, the bytes at the group's bandwidth, and the
    ranks' arrival skew at each call (the compute between calls: ``compute_s`` split over them, None for the
    hardware's probe)."""
    calls = sum(c.calls for c in collectives if c.size > 1 and c.nbytes > 0)
    seconds = 0.0
    for c in collectives:
        if c.size <= 1 or c.nbytes <= 0:
            continue
        fit = group_fit(hardware, c.op, c.size, c.stride)
        wait = hardware.blocking_s(c.size) if compute_s is None else hardware.blocking_s(c.size, compute_s / calls)
        seconds += c.calls * (fit.latency_s + wait) + c.nbytes / fit.bandwidth_Bps
    return seconds


@dataclass(frozen=True)
class GridCost:
    """A grid layer's ``LayerCost`` terms before its model states (``CostModel._with_states`` adds them from
    ``params`` stored per rank, the largest gradient computed whole ``largest_param`` elements)."""

    fwd_s: float
    bwd_s: float
    grad_sync_s: float
    activation_bytes: int
    peak_extra_bytes: int
    params: float
    largest_param: float


def grid_layer_cost(
    cost_model, layer_type: str, strategy: LayerStrategy, micro_batch: int, busy_share, deferred_sync: bool = False
) -> GridCost:
    """``CostModel.layer_cost``'s terms for a grid ``tp_mode``: compute over ``tp`` ranks, the grid's collectives
    (``tp_terms``), data-parallel sync of the ``W / q²`` (3D: ``W / q³``) parameters a rank stores, and memory:
    the activations one micro-batch keeps (a checkpointed layer: its input, in the rows' layout), the backward's
    working set with one gathered input and weight and, checkpointed, the recomputed activations and weights."""
    cm, profile = cost_model, cost_model.model.layer(layer_type)
    P, local = strategy.tp, micro_batch / strategy.dp
    shape = layer_shape(cm, profile, local)
    terms = tp_terms(strategy, shape, cm.mixed_precision)
    casts = cm.cast_params(profile, P, strategy.dp, strategy.dp_type)
    compute = (
        cm.compute_s(profile, "fwd", local, P, busy_share, casts),
        cm.compute_s(profile, "bwd", local, P, busy_share, casts),
    )
    own = (
        compute[0] + collectives_s(cm.hardware, terms.forward, compute[0]),
        compute[1] + collectives_s(cm.hardware, terms.backward, compute[1]),
    )
    q, _, cube = strategy.grid_shape
    # a weight's gradient is computed whole over its gathered block before the reduce-scatter adds it to the stored one
    params, largest = terms.stored_params, profile.largest_param_count / (q if cube == 1 else q * q)
    gather_s, sync_s, transient = dp_comm(cm, params, strategy.dp, strategy.dp_type, False, compute, deferred_sync)
    fwd_s = own[0] + visible_s(cm, gather_s, compute[0], strategy.dp_type)
    bwd_s = own[1] + visible_s(cm, gather_s, compute[1], strategy.dp_type) + (own[0] if strategy.ckpt else 0.0)
    compute_b = COMPUTE_BYTES_PER_PARAM[cm.mixed_precision]
    working = transient + profile.grad_working_per_sample(P, True) * local * cm.activation_scale
    if strategy.ckpt:  # its input, whole in features on the rows' samples (activation_strategy); recomputed, the
        # layer keeps its gathered inputs and weights whole until its backward is done
        kept = profile.ckpt_activation_bytes_per_sample * local * cm.activation_scale * q / P
        recomputed = terms.activation_bytes + terms.gathered_input_bytes + terms.gathered_params * compute_b
        peak_extra = working + recomputed
    else:  # everything gathered is saved as its block (under bf16 autocast the weight blocks' casts): one
        # gathered input and weight alive at a time
        kept = terms.activation_bytes + cm.autocast_cast_bytes(params, strategy.dp, strategy.dp_type)
        peak_extra = working + terms.largest_gathered_bytes + largest * compute_b
    sync_s = visible_s(cm, sync_s, compute[1], strategy.dp_type) + optimizer_s(
        cm, params, strategy.dp, strategy.dp_type
    )
    return GridCost(fwd_s, bwd_s, sync_s, int(kept), int(peak_extra), params, largest)


def layer_shape(cost_model, profile, local: float) -> LayerShape:
    """``profile``'s layer at ``local`` samples per data-parallel replica, in ``cost_model``'s training dtype: the
    model's hidden size (else the boundary bytes per token of the sequence), and as many tokens as the boundary
    activation holds at that size (a layer whose tokens differ from the sequence length, as Swin's, keeps its
    boundary bytes)."""
    dtype_b = DTYPE_BYTES.get(cost_model.model.dtype, 4)
    boundary = profile.boundary_bytes_per_sample / dtype_b  # elements per sample
    hidden = cost_model.model.hidden_size or max(1, round(boundary / cost_model.seq))
    return LayerShape(
        tokens=local * boundary / hidden,
        hidden=hidden,
        act_bytes=dtype_b * cost_model.activation_scale,
        params=float(profile.param_count),
        activation_bytes=profile.activation_per_sample(1, False) * local * cost_model.activation_scale,
    )
