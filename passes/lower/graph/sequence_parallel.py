"""Sequence parallelism in a layer's graph: Megatron-SP and Ulysses, with no per-model code.

Both keep the residual stream sharded along the sequence over the layer's tp group; they differ in where
whole sequences are needed and what the group does with weights:

- ``megatron``: the layer is first made tensor-parallel (``passes.lower.graph.tensor_parallel``). Values enter the
  tensor-parallel region through ``tp_copy``; where such a value is sequence-sharded it is all-gathered
  along the sequence instead (``sp_gather``, reduce-scatter backward), and every ``tp_reduce`` after a
  row-parallel projection becomes a reduce-scatter (``sp_reduce_scatter``, all-gather backward). Norms,
  dropout and residual adds run on sequence shards.
- ``ulysses``: weights stay whole; everything runs on sequence shards except attention, whose q, k, v go
  from sequence to head sharding by an all-to-all (``seq_to_heads``) and back after it (``heads_to_seq``).
- ``vsp``: Galvatron's vsp, for the embedding (prologue) and the head with its loss (epilogue) over their vtp
  group: weights whole, everything on sequence shards, nothing that needs whole sequences (no attention, no
  op that moves values along the sequence). The token ids arrive sequence-split like the hidden states; other
  integer inputs (labels) arrive whole, so that a shift of the targets along the sequence (Hugging Face causal
  LMs shift inside the loss) is computed on whole sequences; a cross-entropy over sharded rows takes the rows
  of its target that match its logits (``sp_slice``) and becomes ``sequence_cross_entropy`` (the group's mean).
  Whole values meeting shards are sliced with ``sp_slice`` and parameters get no ``tp_copy``: each rank's
  gradients cover its own positions, and the runtime sums them over the stage as data parallelism does.

How the sequence is found: the factor analysis of ``passes.analysis.dim_tracking`` follows the sequence dimension of
the layer's first batched activation through views, transposes and merges (GPT-2's ``[batch * seq]``), so
every value knows where its sequence factor sits. Which inputs arrive sharded: those with that factor that
reach work outside the whole-sequence region (not only attention or the tensor-parallel region); inputs
that are not batched (rotary tables) are split in the layer. Under vsp the prologue's sequence is that of
its token ids. States then propagate in graph order: a value
computed from a sharded value is sharded, views of sharded values get the local sequence length, and whole
values meeting sharded ones are split. Parameters used on sequence shards have gradients that are partial
sums over the group: the layer's meta lists them (``partial_grads``) and the runtime adds them up once per
step after backward. Ops that mix positions along the sequence outside attention are refused.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import get_attr_path
from galvatron_fx.passes.analysis.batch_dim import is_size_node
from galvatron_fx.passes.analysis.dim_factors import rewrite_sizes
from galvatron_fx.passes.analysis.dim_tracking import (
    POINTWISE_EXTRA,
    VIEWS,
    feeds_only_matmuls,
    param_matmul,
    rewritten_meta,
)
from galvatron_fx.passes.lower.graph.random_streams import mark_sharded
from galvatron_fx.passes.lower.graph.tensor_parallel import TPConfig, TPResult, tensor_parallel, tp_region
from galvatron_fx.passes.lower.graph.tracked_factor import TrackedFactor
from galvatron_fx.passes.lower.ops.collectives import (
    heads_to_seq,
    seq_to_heads,
    sp_gather,
    sp_reduce_scatter,
    sp_slice,
    sp_split,
    tp_copy,
    tp_reduce,
    tp_scatter,
)
from galvatron_fx.passes.lower.ops.vocab import sequence_cross_entropy
from galvatron_fx.program import set_layer_meta

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CROSS_ENTROPY = aten.cross_entropy_loss.default
TRANSPARENT = VIEWS | {
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.transpose.int,
    aten.permute.default,
    aten.t.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten._assert_tensor_metadata.default,
    operator.getitem,
}
REDUCTIONS = {
    aten.mean.dim,
    aten.sum.dim_IntList,
    aten.amax.default,
    aten.amin.default,
    aten._softmax.default,
    aten.softmax.int,
    aten._log_softmax.default,
    aten.log_softmax.int,
    aten.cumsum.default,
}


@dataclass(frozen=True)
class SPConfig:
    """Sequence parallelism ``mode`` ("megatron", "ulysses", or "vsp" for the embedding and head) over ``ranks``
    (this process: ``tp_rank``); ``batched``: placeholders whose dim 0 is the batch (they can arrive sharded by
    redistribution)."""

    mode: str
    tp: int
    tp_rank: int
    ranks: tuple[int, ...]
    batched: frozenset[str] = frozenset()
    strict: bool = False
    # parameters other layers use too: a step's sum of this layer's partial gradients would add theirs as well
    shared_params: frozenset[str] = frozenset()

    @property
    def remedy(self) -> str:
        return "use vsp=False" if self.mode == "vsp" else "use sp='none' for this layer"


@dataclass
class SPResult:
    module: fx.GraphModule
    seq_inputs: frozenset[str] = frozenset()  # placeholders that arrive sequence-sharded
    seq_outputs: tuple[bool, ...] = ()  # per output: sequence-sharded?
    tensor_parallel: TPResult | None = None
    warnings: list[str] = field(default_factory=list)


def _sequence(gm: fx.GraphModule, cfg: SPConfig) -> TrackedFactor:
    """The sequence factor: dim 1 of the first batched activation (under vsp: of the token ids first)."""
    placeholders = [n for n in gm.graph.find_nodes(op="placeholder") if n.name in cfg.batched]
    sources = [n for n in placeholders if _is_float(n) and n.meta["val"].dim() >= 3]
    if cfg.mode == "vsp":  # the embedding's sequence is that of its token ids, the head's that of [b, s, h]
        sources = [n for n in placeholders if _is_token_ids(n)] + [n for n in sources if n.meta["val"].dim() == 3]
    return TrackedFactor(gm, sources, 1, cfg.tp)


def _is_float(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _is_token_ids(node: fx.Node) -> bool:
    """An integer ``[batch, sequence, ...]`` value that an embedding looks up (through layout-neutral ops)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dim() < 2:
        return False
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen or user.op != "call_function":
            continue
        seen.add(user)
        if user.target is aten.embedding.default and user.args[1] in seen | {node}:
            return True
        if user.target in TRANSPARENT:
            stack.extend(user.users)
    return False


def _keeps_positions(node: fx.Node, seq: TrackedFactor, gm: fx.GraphModule) -> bool:
    """Under vsp: whether ``node``, reading a sequence shard, computes each position from that position alone
    (elementwise work, views, norms and reductions over other dims, projections, embedding lookups). Anything
    else (indexing, slicing, padding, shifting along the sequence...) is refused rather than guessed."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return True
    if target in TRANSPARENT or target in POINTWISE_EXTRA or target in REDUCTIONS or param_matmul(gm, node):
        return True
    if target in (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default):
        where = seq.position(node.args[0], True)
        return where is None or where[0] < node.args[0].meta["val"].dim() - len(node.args[1])
    return target is aten.embedding.default


def _whole_region(gm: fx.GraphModule, mode: str) -> set[fx.Node]:
    """Nodes that need whole sequences: the tensor-parallel region (megatron) or attention (ulysses, vsp)."""
    if mode != "megatron":
        return set(gm.graph.find_nodes(op="call_function", target=SDPA))
    return tp_region(gm)


def wants_shards(node: fx.Node, region: set[fx.Node]) -> bool:
    """Does ``node`` reach work outside ``region`` (where values must be whole) through layout-neutral ops?"""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen or user in region or user.op == "output":
            continue
        seen.add(user)
        if is_size_node(user):
            continue
        if user.op == "call_function" and user.target in TRANSPARENT:
            stack.extend(user.users)
        elif user.op == "call_function":
            return True
    return False


def _check_mixing(node: fx.Node, seq: TrackedFactor, gm: fx.GraphModule) -> None:
    """Refuse ops that combine positions along the sequence while it is sharded."""
    where = seq.position(node.args[0], True) if node.args and isinstance(node.args[0], fx.Node) else None
    mixes = node.target in (SDPA, aten.bmm.default) or (
        node.target in (aten.mm.default, aten.matmul.default) and not param_matmul(gm, node)
    )
    if node.target in REDUCTIONS and where is not None:
        value = node.args[0].meta["val"]
        reduced = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(value.dim()))
        reduced = [reduced] if isinstance(reduced, int) else reduced
        mixes = any(r % value.dim() == where[0] for r in reduced)
    if mixes:
        raise PlanError(
            f"sequence parallelism: {node.name} ({node.target}) combines positions along the sharded sequence",
            "use sp='none' for this layer",
        )


def _sequence_loss(gm: fx.GraphModule, loss: fx.Node, seq: TrackedFactor, cfg: SPConfig, sharded: set, what: str):
    """Under vsp: replace the cross-entropy ``loss`` over sequence-sharded logits by ``sequence_cross_entropy``
    over this rank's rows and their targets; returns the new node."""
    logits, target, *rest = loss.args
    weight, reduction, ignore_index, smoothing = (rest + [None, 1, -100, 0.0][len(rest) :])[:4]
    if weight is not None or reduction != 1 or smoothing:
        raise PlanError(
            f"{what}: vsp supports a mean cross-entropy without class weights or label smoothing ({loss.name})",
            cfg.remedy,
        )
    where = seq.position(logits, False)
    if logits.meta["val"].dim() != 2 or where is None or where[0] != 0:
        raise PlanError(
            f"{what}: the logits of {loss.name} are not [rows, classes] with the sequence among the rows",
            cfg.remedy,
        )
    graph = gm.graph
    if target not in sharded:  # whole targets (labels shifted on whole sequences): this rank's rows
        _, sizes, index = where
        if target.meta["val"].shape[0] != math.prod(sizes):
            raise PlanError(
                f"{what}: the targets of {loss.name} do not match its {math.prod(sizes)} rows of logits", cfg.remedy
            )
        with graph.inserting_before(loss):
            target = graph.call_function(sp_slice, (target, 0, sizes, index, cfg.ranks))
    with graph.inserting_before(loss):
        value = graph.call_function(sequence_cross_entropy, (logits, target, cfg.ranks, ignore_index))
    loss.replace_all_uses_with(value)
    graph.erase_node(loss)
    return value


def _partial_grad_params(gm: fx.GraphModule, sharded: set[fx.Node], cfg: SPConfig) -> dict[str, tuple]:
    """Parameters used on sequence shards only: each rank's gradient is a partial sum over ``cfg.ranks``, which
    the runtime adds up once per step after backward (``runtime.data_parallel.PartialGradSum``), one all-reduce
    per layer, not one per parameter and micro-batch inside backward. A parameter also used on whole values, or
    by other layers (``cfg.shared_params``), gets ``tp_copy`` on its sharded uses instead: only their gradient is
    partial. vsp's embedding and head need neither: the runtime sums their gradients over the whole stage, as
    data parallelism does."""
    ranks = cfg.ranks
    uses: dict[str, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        if isinstance(get_attr_path(gm, node.target), nn.Parameter):
            uses.setdefault(node.target, []).append(node)
    partial = {}
    for target, nodes in uses.items():
        users = {user for node in nodes for user in node.users}
        if not users & sharded:
            continue
        if users <= sharded and target not in cfg.shared_params:
            partial[target] = ranks
            continue
        for node in nodes:
            with gm.graph.inserting_after(node):
                copy = gm.graph.call_function(tp_copy, (node, ranks))
            node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy and user in sharded)
    return partial


def sequence_parallel(gm: fx.GraphModule, cfg: SPConfig, layer_name: str = "layer") -> SPResult:
    """Requires: an ATen-level layer GraphModule with ``meta["val"]``, at the layer's local batch, full
    parameters. Ensures: ``gm`` rewritten for ``cfg.mode`` on rank ``cfg.tp_rank`` (megatron: tensor-parallel
    too); ``layer_meta(gm)`` and the result say which inputs arrive and which outputs leave
    sequence-sharded. Raises PlanError for sequences the group cannot split or ops that mix along them."""
    result = SPResult(gm)
    seq = _sequence(gm, cfg)
    vsp = cfg.mode == "vsp"
    if seq.cls is None:
        raise PlanError(
            f"{layer_name}: sequence parallelism found no [batch, sequence, ...] "
            f"{'activation or token ids' if vsp else 'activation'} among the layer's inputs",
            cfg.remedy,
        )
    if seq.length % cfg.tp:
        raise PlanError(
            f"{layer_name}: sequence length {seq.length} is not divisible by the group size {cfg.tp}"
            + (" (vsp splits the sequence over the vtp group)" if vsp else ""),
            f"use a sequence length divisible by {cfg.tp}, or " + ("vsp=False" if vsp else "sp='none'"),
        )
    if cfg.mode == "megatron":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result.tensor_parallel = tensor_parallel(
                gm, TPConfig(cfg.tp, cfg.tp_rank, cfg.ranks, cfg.strict), layer_name
            )
        result.warnings = [str(w.message) for w in caught]
    graph, ranks = gm.graph, cfg.ranks
    region = _whole_region(gm, cfg.mode)
    sharded: set[fx.Node] = set()

    # Ulysses: a replicated value's slices have replicated gradients (all-gathered); vsp: each rank's own part
    keep_part = sp_slice if vsp else sp_split

    def split(value: fx.Node, before: fx.Node) -> fx.Node:
        dim, sizes, index = seq.position(value, False)
        with graph.inserting_before(before):
            return graph.call_function(keep_part, (value, dim, sizes, index, ranks))

    seq_inputs = set()
    for node in list(graph.find_nodes(op="placeholder")):
        wanted = _is_float(node) and wants_shards(node, region)
        if not ((wanted or (vsp and _is_token_ids(node))) and seq.position(node, False)):
            continue
        if node.name in cfg.batched and seq.position(node, False)[0] == 1:
            seq_inputs.add(node.name)
            sharded.add(node)
        else:  # whole on every rank (a rotary table): keep this rank's part
            with graph.inserting_after(node):
                part = graph.call_function(keep_part, (node, *seq.position(node, False), ranks))
            node.replace_all_uses_with(part, delete_user_cb=lambda user: user is not part)
            sharded.add(part)

    for node in list(graph.nodes):
        # sizes read from shards are batch sizes (the sequence is never a symbol), the same on every rank
        if node.op != "call_function" or node in sharded or node.target is sp_split or is_size_node(node):
            continue
        inputs = node.all_input_nodes
        if node.target is tp_copy and inputs[0] in sharded:  # entering the TP region: gather the sequence
            with graph.inserting_before(node):
                args = (inputs[0], *seq.position(inputs[0], True), ranks, True, feeds_only_matmuls(node))
                whole = graph.call_function(sp_gather, args)
            node.replace_all_uses_with(whole)
            graph.erase_node(node)
        elif node.target is tp_scatter and inputs[0] in sharded:
            with graph.inserting_before(node):
                whole = graph.call_function(sp_gather, (inputs[0], *seq.position(inputs[0], True), ranks, False))
            node.replace_input_with(inputs[0], whole)
        elif node.target is tp_reduce and seq.position(inputs[0], False):  # leaving it: reduce-scatter
            with graph.inserting_before(node):
                part = graph.call_function(sp_reduce_scatter, (inputs[0], *seq.position(inputs[0], False), ranks))
            node.replace_all_uses_with(part)
            graph.erase_node(node)
            sharded.add(part)
        elif vsp and node.target is CROSS_ENTROPY and node.args[0] in sharded:
            _sequence_loss(gm, node, seq, cfg, sharded, layer_name)
        elif node.target is SDPA and cfg.mode == "ulysses":
            for qkv in node.args[:3]:
                if qkv not in sharded:
                    raise PlanError(
                        f"{layer_name}: attention input {qkv.name} is not sequence-sharded",
                        "use sp='none' for this layer",
                    )
                if qkv.meta["val"].shape[-3] % cfg.tp:
                    raise PlanError(
                        f"{layer_name}: {qkv.meta['val'].shape[-3]} attention heads are not divisible by the Ulysses "
                        f"degree {cfg.tp}",
                        "choose a degree that divides the (key/value) heads, or sp='none'",
                    )
                with graph.inserting_before(node):
                    node.replace_input_with(qkv, graph.call_function(seq_to_heads, (qkv, ranks)))
            with graph.inserting_after(node):
                back = graph.call_function(heads_to_seq, (node, ranks))
            node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
            sharded.add(back)
        elif any(a in sharded for a in inputs):
            if node in region:
                raise PlanError(
                    f"{layer_name}: {node.name} needs the whole sequence but reads a sharded value",
                    "use sp='none' for this layer",
                )
            if vsp and not _keeps_positions(node, seq, gm):
                raise PlanError(
                    f"{layer_name}: {node.name} ({node.target}) may move values along the sequence, which vsp "
                    "splits over the vtp group",
                    cfg.remedy,
                )
            _check_mixing(node, seq, gm)
            for arg in inputs:  # whole values with the sequence meet shards: keep this rank's part
                if arg not in sharded and (_is_float(arg) or vsp) and seq.position(arg, False) and arg.op != "get_attr":
                    node.replace_input_with(arg, split(arg, node))
            sharded.add(node)
            if node.target in VIEWS | {aten.expand.default} and seq.dims(node) is not None:
                node.args = (
                    node.args[0],
                    rewrite_sizes(node.args[1], seq.local_sizes(node), list(node.meta["val"].shape)),
                    *node.args[2:],
                )

    partial_grads = {} if vsp else _partial_grad_params(gm, sharded, cfg)

    heads = set(graph.find_nodes(op="call_function", target=SDPA)) if cfg.mode == "ulysses" else set()
    mark_sharded(sharded | heads)  # sequence shards; Ulysses' attention runs on head shards
    for node in graph.find_nodes(op="placeholder"):
        if node.name in seq_inputs:
            value = node.meta["val"]
            node.meta["val"] = torch.empty(
                (value.shape[0], value.shape[1] // cfg.tp, *value.shape[2:]), dtype=value.dtype, device="meta"
            )
    outputs = graph.output_node().args[0]
    result.seq_inputs = frozenset(seq_inputs)
    result.seq_outputs = tuple(isinstance(o, fx.Node) and o in sharded for o in outputs)
    set_layer_meta(gm, seq_inputs=result.seq_inputs, seq_outputs=result.seq_outputs, partial_grads=partial_grads)
    graph.lint()
    gm.recompile()
    rewritten_meta(gm, f"{layer_name}: sequence parallelism ({cfg.mode})", cfg.remedy)
    return result
