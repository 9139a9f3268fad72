"""Memory terms: bytes of model states per parameter, and how a layer's saved activations split under TP.

Model states, per parameter (Adam): 4 fp32 parameter + 4 fp32 gradient + 8 Adam moments = 16 bytes, in
fp32 and bf16 alike: bf16 mixed precision keeps the fp32 parameters as the master copy and accumulates
gradients in fp32 (so that small updates are not lost), as the runtime runs it (``runtime/train.py``).
What bf16 changes is the copy a layer computes on (``COMPUTE_BYTES_PER_PARAM``): ZeRO gathers 2-byte
parameters (ZeRO-2 keeps them gathered from forward to backward; ZeRO-3 frees them after each pass), and a
replicated layer's autocast casts its weights to bf16 in every forward, the casts held, like activations,
until that micro-batch's backward (``CostModel``'s ``autocast_cast_bytes``); a checkpointed layer's forward
keeps none of them, its recomputation casts again.
ZeRO-2 shards gradients and optimizer states over the data-parallel group; ZeRO-3 shards all three.

Peak bytes of a stage follow the step's phases (``InFlight``): before the first backward of a step the
activations in flight are live but no gradient is (``zero_grad(set_to_none=True)``: backward allocates
them), except DDP's, which live in buckets that persist between steps; after it, gradients persist until
the optimizer step; the optimizer step holds gradients and its own temporaries. Two figures:
- ``InFlight.stage_peak``, the prediction: the stage's backward walked layer by layer, last to first. While
  a layer's backward runs, the micro-batch under backward has freed the activations of the layers after it
  and (in a step's first backward) only those layers have gradients; the layer's transient comes on top.
- ``InFlight.layer_bytes`` summed over the layers plus the largest transient
  (``LayerCost.transient_bound_bytes``), the search's budget: each layer in its own worst phase, all
  transients at the peak of all activations. It is additive over layers, which the search's fronts need,
  and never below ``stage_peak``; the two agree when every layer of the stage peaks in the same phase with
  the same transient.

Activation gradients: ``grad_working_bytes`` walks a layer's backward node by node, net of the activations
it frees on the way; the cost model adds it to the layer's transient.

Activations: ``tp_activation_parts`` walks a layer's nodes and marks which saved tensors a Megatron
lowering would shard over the TP group — everything computed from a column-parallel projection's output
until a row-parallel projection brings the result back to a replicated tensor, the row-parallel projection's
saved input included — and which are the column-parallel projections' own inputs, whole under Megatron TP and
kept as sequence shards under Megatron-SP. TP lowering is a later step: this is the analytic scaling the cost
model uses until measured per-TP activations exist.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from galvatron_fx.program import Layer, node_meta

# DDP layers keep their gradients in flat buckets of up to this many bytes (DDP's default bucket_cap_mb):
# the buckets persist between steps, and each pays one all-reduce latency
GRAD_BUCKET_CAP_BYTES = 25 * 2**20
# (parameter, gradient, optimizer) bytes per parameter stored: fp32 master parameters and gradients
STATE_BYTES_PER_PARAM = {"fp32": (4, 4, 8), "bf16": (4, 4, 8)}
# bytes per parameter of the copy a layer computes on: what ZeRO gathers, what autocast casts to
COMPUTE_BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_LINEAR_OPS = {
    torch.ops.aten.linear.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.matmul.default,
    torch.ops.aten.bmm.default,
}


def check_precision(mixed_precision: str) -> None:
    from galvatron_fx.errors import ConfigError

    if mixed_precision not in STATE_BYTES_PER_PARAM:
        raise ConfigError(
            f"mixed_precision={mixed_precision!r} is unknown", f"use one of {sorted(STATE_BYTES_PER_PARAM)}"
        )


def model_state_bytes(param_count: float, dp: int, dp_type: str, mixed_precision: str) -> int:
    """Bytes of parameters, gradients and Adam states that one device of a ``dp``-way group holds."""
    check_precision(mixed_precision)
    param_b, grad_b, optim_b = STATE_BYTES_PER_PARAM[mixed_precision]
    if dp_type == "zero3":
        per_param = (param_b + grad_b + optim_b) / dp
    elif dp_type == "zero2":  # the gathered copy; the shard besides it is the caller's (CostModel)
        per_param = COMPUTE_BYTES_PER_PARAM[mixed_precision] + (grad_b + optim_b) / dp
    else:
        per_param = param_b + grad_b + optim_b
    return int(param_count * per_param)


def model_state_split(param_count: float, dp: int, dp_type: str, mixed_precision: str) -> tuple[int, int]:
    """(model-state bytes, of which gradient bytes) that one device of a ``dp``-way group holds."""
    grad_b = STATE_BYTES_PER_PARAM[mixed_precision][1]
    grads = param_count * grad_b / (dp if dp_type in ("zero2", "zero3") else 1)
    return model_state_bytes(param_count, dp, dp_type, mixed_precision), int(grads)


@dataclass(frozen=True)
class InFlight:
    """Micro-batches whose activations a stage holds: ``first`` at its first backward of a step (no
    gradient exists yet), ``later`` at any later backward (gradients of earlier micro-batches exist)."""

    first: int
    later: int

    @staticmethod
    def of(pipeline: str, pp: int, stage: int, chunks: int) -> "InFlight":
        """GPipe holds every micro-batch, 1F1B at most ``pp - stage``; after the first backward one fewer is
        held, unless a forward of a micro-batch not yet started refills it (1F1B with more chunks)."""
        first = chunks if pipeline == "gpipe" else min(chunks, pp - stage)
        return InFlight(first, first if chunks > first else first - 1)

    @staticmethod
    def least(values) -> "InFlight":
        """Fieldwise minimum: no stage of ``values`` holds fewer (for lower bounds on memory)."""
        values = list(values)
        return InFlight(min(v.first for v in values), min(v.later for v in values))

    def __le__(self, other: "InFlight") -> bool:
        return self.first <= other.first and self.later <= other.later

    def layer_bytes(self, model_state, activation, grad, optimizer_temp):
        """Bytes of a layer (scalars or numpy arrays) in its worst phase: before the first backward
        (states without gradients + ``first`` activations), at a later backward (+ gradients, ``later``
        activations), or in the optimizer step (states + its temporaries)."""
        backward = np.maximum(self.first * activation, self.later * activation + grad)
        return model_state - grad + np.maximum(backward, grad + optimizer_temp)

    def stage_peak(self, layers) -> int:
        """Peak bytes of a stage whose ``layers`` (forward order; objects with LayerCost's byte fields) run
        their backward last to first: the step's first backward, a later one (if any), or the optimizer step."""
        states = sum(layer.model_state_bytes for layer in layers)
        grads = sum(layer.grad_bytes for layer in layers)
        activations = sum(layer.activation_bytes for layer in layers)
        peak = states + sum(layer.optimizer_temp_bytes for layer in layers)
        freed = made = 0  # activations freed and gradients made by the layers after the one in backward
        for layer in reversed(layers):
            # a backward that finds a stored weight gradient computes the new one whole, then adds it: any
            # later backward; the first too where gradients persist between steps (DDP's buckets, grad_bytes 0)
            accumulate_first = layer.accumulate_bytes if layer.grad_bytes == 0 else 0
            peak = max(
                peak,
                states - grads + made + self.first * activations - freed + layer.peak_extra_bytes + accumulate_first,
            )
            if self.later:
                peak = max(
                    peak, states + self.later * activations - freed + layer.peak_extra_bytes + layer.accumulate_bytes
                )
            freed, made = freed + layer.activation_bytes, made + layer.grad_bytes
        return int(peak)


def _is_param(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        graph_module.get_parameter(node.target)
        return True
    except AttributeError:
        return False


def _tp_sharded_nodes(graph_module: fx.GraphModule, layer: Layer) -> set[str]:
    """Names of ``layer``'s nodes whose values a Megatron lowering shards over the TP group: a projection
    with a parameter weight whose input is replicated is column-parallel (its output is sharded); one whose
    input is sharded is row-parallel (output replicated after the all-reduce); any other op is sharded when
    one of its inputs is."""
    nodes = {n.name: n for n in graph_module.graph.nodes}
    sharded: set[str] = set()
    for name in layer.node_names:
        node = nodes[name]
        any_sharded = any(n.name in sharded for n in node.all_input_nodes if n.op != "get_attr")
        projection = node.target in _LINEAR_OPS and any(_is_param(graph_module, n) for n in node.all_input_nodes)
        if any_sharded != projection:  # a projection flips its input's state, any other op keeps it
            sharded.add(name)
    return sharded


def tp_activation_parts(
    graph_module: fx.GraphModule, layer: Layer, saved_bytes: dict[str, int] | None = None
) -> tuple[int, int, int]:
    """(replicated, gathered, TP-sharded) saved-activation bytes of ``layer`` for the Program's example batch;
    ``saved_bytes``: node name → the bytes it saves, where not the annotation's (a run under autocast).

    Autograd attributes a saved tensor to the op that saves it, and a projection saves its input, whose
    layout is not its output's: a column-parallel projection (replicated input, sharded output) saves a
    replicated value — ``gathered``: whole under Megatron TP; under Megatron-SP the all-gathered input, which
    the lowered runtime keeps as the sequence shard it was gathered from (passes/lower/ops/regather.py) — and a
    row-parallel one (sharded input, replicated output after the all-reduce) saves a sharded value. Any other
    op's saved bytes follow its output's layout: ``replicated`` outside the TP region (sequence-sharded under
    Megatron-SP), sharded inside it.

    Requires node annotations (``node_meta(node).info``: ``saved_bytes``, shape, dtype) on ``graph_module``,
    the flat graph; which values are sharded follows ``_tp_sharded_nodes``.
    """
    nodes = {n.name: n for n in graph_module.graph.nodes}
    sharded = _tp_sharded_nodes(graph_module, layer)
    replicated_bytes = gathered_bytes = sharded_bytes = 0
    for name in layer.node_names:
        node = nodes[name]
        info = node_meta(node).info
        saved = saved_bytes.get(name, 0) if saved_bytes is not None else info.saved_bytes if info is not None else 0
        if node.target in _LINEAR_OPS and _is_param_projection(graph_module, node):
            inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
            whole_inputs = sum(_value_bytes(n) for n in inputs if n.name not in sharded)
            gathered = min(saved, whole_inputs)
            gathered_bytes += gathered
            sharded_bytes += saved - gathered
        elif name in sharded:
            sharded_bytes += saved
        else:
            replicated_bytes += saved
    return replicated_bytes, gathered_bytes, sharded_bytes


def tp_activation_split(graph_module: fx.GraphModule, layer: Layer) -> tuple[int, int]:
    """(replicated, TP-sharded) saved-activation bytes of ``layer`` under Megatron TP without SP: the
    column-parallel projections' saved inputs are whole on every rank (``tp_activation_parts``). Under the fake
    process group a BERT layer at tp4 (fp32, 8 samples) keeps 449 KiB a sample, as this split gives; before, a
    row-parallel projection's saved input counted as replicated and a column-parallel one's as sharded: 545."""
    replicated, gathered, sharded = tp_activation_parts(graph_module, layer)
    return replicated + gathered, sharded


def saved_without_weight_casts(
    graph_module: fx.GraphModule, layer: Layer, saved_bytes: dict[str, int]
) -> dict[str, int]:
    """``saved_bytes`` (node → bytes it saves under bf16 autocast) less the bf16 casts of the weights the layer's
    projections save with their inputs, each weight once (autocast casts it once per forward), which the cost
    model counts apart (``CostModel.autocast_cast_bytes``)."""
    out, cast, own = {}, set(), set(layer.node_names)
    for node in graph_module.graph.nodes:
        if node.name not in own:
            continue
        weights = [
            n
            for n in node.all_input_nodes
            if node.target in _LINEAR_OPS and _is_param(graph_module, n) and n.target not in cast
        ]
        cast.update(n.target for n in weights)
        matrices = [graph_module.get_parameter(n.target) for n in weights]
        casts = sum(w.numel() for w in matrices if w.dim() >= 2)  # a bias's cast is not saved
        out[node.name] = max(0, saved_bytes.get(node.name, 0) - casts * DTYPE_BYTES["bf16"])
    return out


def _is_param_projection(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    return any(_is_param(graph_module, n) for n in node.all_input_nodes)


def _value_bytes(node: fx.Node) -> int:
    info = node_meta(node).info
    if info is None or info.shape is None or info.dtype is None:
        return 0
    return math.prod(info.shape) * info.dtype.itemsize


def _needs_grad(graph_module: fx.GraphModule) -> set[str]:
    """Names of the nodes autograd computes a gradient for: floating values that depend on a parameter."""
    params = {name for name, p in graph_module.named_parameters(remove_duplicate=False) if p.requires_grad}
    out: set[str] = set()
    for node in graph_module.graph.nodes:
        info = node_meta(node).info
        floating = info is not None and (info.dtype is None or info.dtype.is_floating_point)  # None: a tuple
        if node.op == "get_attr":
            if node.target in params:
                out.add(node.name)
        elif node.op == "call_function" and floating and any(i.name in out for i in node.all_input_nodes):
            out.add(node.name)
    return out


def _passes_gradient_through(node: fx.Node) -> bool:
    """Its input's gradient is a view of its own (a view op, or an item of a tuple output): no allocation."""
    return node.target is operator.getitem or (isinstance(node.target, torch._ops.OpOverload) and node.target.is_view)


def grad_working_bytes(graph_module: fx.GraphModule, layer: Layer, tp: int = 1) -> int:
    """Peak bytes of activation gradients ``layer``'s backward holds, net of the saved activations it has
    freed by then, on one of ``tp`` Megatron ranks, for the Program's example batch.

    The backward is walked in reverse forward order: the gradients of the values later layers read are live
    at its start; each node's backward allocates its inputs' gradients (a view passes its own on), then
    frees its own gradient and the activations it was the first to save. Weight gradients are model states
    and not counted here. Requires node annotations (shape, dtype, saved_bytes)."""
    nodes = {n.name: n for n in graph_module.graph.nodes}
    needs_grad = _needs_grad(graph_module)
    sharded = _tp_sharded_nodes(graph_module, layer) if tp > 1 else set()
    in_layer = set(layer.node_names)

    def grad_bytes(node: fx.Node) -> float:
        info = node_meta(node).info
        if info is None or info.shape is None or info.dtype is None:
            return 0.0
        return math.prod(info.shape) * info.dtype.itemsize / (tp if node.name in sharded else 1)

    live = {
        name: grad_bytes(nodes[name])
        for name in layer.node_names
        if name in needs_grad and any(user.name not in in_layer for user in nodes[name].users)
    }
    peak = sum(live.values())
    freed = 0
    for name in reversed(layer.node_names):
        node = nodes[name]
        grad = live.pop(name, None)
        if grad is None:
            continue  # no gradient reaches it
        inputs = [i for i in dict.fromkeys(node.all_input_nodes) if i.name in needs_grad and i.op != "get_attr"]
        if _passes_gradient_through(node):
            for i in inputs[:1]:
                live[i.name] = live.get(i.name, 0.0) + grad
            continue
        new = {i.name: grad_bytes(i) for i in inputs if i.name not in live}
        peak = max(peak, sum(live.values()) + grad + sum(new.values()) - freed)
        live.update(new)
        info = node_meta(node).info
        freed += info.saved_bytes if info is not None else 0
    return int(max(peak, 0))
