"""Grid tensor parallelism in a layer's graph: 2D (SUMMA / Optimus) and 2.5D (Tesseract), with no per-model code.

A grid layer's ``tp`` ranks form ``depth × q × q`` (``parallel_dims``): the q ranks of a *row* split the features
and hold the same samples; the samples are split over the ``depth × q`` rows. Inside the layer every activation
is one block (its samples split over the rows, its features — hidden size, attention heads, MLP columns — over
the row), and every parameter is one block (split over the row as Megatron splits it, and over the *column*).

How the graph is rewritten, in order:

1. The projections become tensor-parallel over the row (``tensor_parallel``, strict): Megatron's column- and
   row-parallel pairs found from the graph, ``tp_copy`` where values enter them, ``tp_reduce`` after them.
2. The hidden features are split over the row everywhere else. They are the last dimension of the layer's
   activation input, followed through adds, norms and views by the factor analysis (``TrackedFactor``). Inputs
   that carry them are split on entry (``sp_split``); a value entering a column-parallel projection is
   all-gathered along the features instead of copied (``sp_gather``: its gradient is reduce-scattered); the
   partial sums after a row-parallel projection are reduce-scattered along the features instead of
   all-reduced (``sp_reduce_scatter``); norms take their statistics over the row (``row_layer_norm``,
   ``row_mean``); parameters and whole values that meet feature blocks keep this rank's slice; outputs are
   gathered on exit.
3. Every parameter is split once more over the column group and all-gathered before use (``grid_param``, a
   visible node per parameter): 1/q² of each weight per rank, its gradient the mean over the column and depth
   groups, which ran other samples.

Between layers a grid layer's activations are whole in features and split over its rows in samples
(``parallel_dims.activation_strategy``): the stage's layouts convert them like any other layer's. Ops that would
mix the split features in another way (a softmax over the hidden size, a projection left whole) are refused with
the op named, and the search leaves the mode out for that layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import get_attr_path, set_attr_path
from galvatron_fx.parallel_dims import GridGroups
from galvatron_fx.passes.analysis.batch_dim import is_size_node
from galvatron_fx.passes.analysis.dim_factors import rewrite_sizes
from galvatron_fx.passes.analysis.dim_tracking import VIEWS, param_matmul, rewritten_meta
from galvatron_fx.passes.lower.graph.random_streams import mark_sharded
from galvatron_fx.passes.lower.graph.sequence_parallel import REDUCTIONS, wants_shards
from galvatron_fx.passes.lower.graph.tensor_parallel import ShardRecord, TPConfig, tensor_parallel, tp_region
from galvatron_fx.passes.lower.graph.tracked_factor import TrackedFactor
from galvatron_fx.passes.lower.ops.collectives import (
    sp_gather,
    sp_reduce_scatter,
    sp_split,
    tp_copy,
    tp_reduce,
    tp_scatter,
)
from galvatron_fx.passes.lower.ops.grid import grid_param, row_layer_norm, row_mean, row_total
from galvatron_fx.program import layer_meta, set_layer_meta

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.scaled_dot_product_attention.default}
ROW_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}
REMEDY = "use tp_mode '1d' for this layer"


@dataclass(frozen=True)
class GridConfig:
    """The grid's groups as seen from global rank ``rank``; ``batched``: placeholders whose dim 0 is the batch."""

    groups: GridGroups
    rank: int
    batched: frozenset[str] = frozenset()

    @property
    def q(self) -> int:
        return len(self.groups.row)


@dataclass
class GridResult:
    module: fx.GraphModule
    sharded: list[str] = field(default_factory=list)  # parameters held as blocks


def _is_float(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _hidden(gm: fx.GraphModule, cfg: GridConfig, layer_name: str) -> TrackedFactor:
    sources = [
        n
        for n in gm.graph.find_nodes(op="placeholder")
        if n.name in cfg.batched and _is_float(n) and n.meta["val"].dim() >= 2
    ]
    hidden = TrackedFactor(gm, sources, -1, cfg.q)
    if hidden.cls is None:
        raise PlanError(
            f"{layer_name}: a grid found no batched activation [batch, ..., hidden] among its inputs", REMEDY
        )
    if hidden.length % cfg.q:
        raise PlanError(
            f"{layer_name}: hidden size {hidden.length} is not divisible by the grid's row of {cfg.q}",
            f"{REMEDY}, or a grid whose q divides {hidden.length}",
        )
    return hidden


def _ndim(node: fx.Node) -> int:
    """Dimensions of ``node``'s value; an inserted collective has its input's."""
    while "val" not in node.meta and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.meta["val"].dim()


def _refuse(layer_name: str, node: fx.Node, why: str):
    raise PlanError(f"{layer_name}: {node.name} ({node.target}) {why}", REMEDY)


def _reduced_dims(node: fx.Node) -> list[int]:
    ndim = _ndim(node.args[0])
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(ndim))
    return [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]


class _Rewrite:
    """Step 2 of the module docstring over one graph, in graph order."""

    def __init__(self, gm: fx.GraphModule, cfg: GridConfig, hidden: TrackedFactor, layer_name: str):
        self.gm, self.graph, self.cfg, self.hidden, self.what = gm, gm.graph, cfg, hidden, layer_name
        self.row = cfg.groups.row
        self.sharded: set[fx.Node] = set()

    def whole_position(self, value: fx.Node):
        """Where a whole value carries the hidden features: as the factor analysis says, or, for a value the
        analysis did not align (a bias added after a projection), a last dimension of the hidden size."""
        where = self.hidden.position(value, False)
        shape = value.meta["val"].shape if _is_float(value) else ()
        if where is None and len(shape) and shape[-1] == self.hidden.length:
            where = (len(shape) - 1, (self.hidden.length,), 0)
        return where

    def split(self, value: fx.Node, before: fx.Node) -> fx.Node:
        """This rank's feature slice of a whole value (its gradient all-gathered back)."""
        with self.graph.inserting_before(before):
            return self.graph.call_function(sp_split, (value, *self.whole_position(value), self.row))

    def run(self, region: set[fx.Node]) -> None:
        graph, hidden = self.graph, self.hidden
        for node in list(graph.find_nodes(op="placeholder")):
            if _is_float(node) and hidden.position(node, False) and wants_shards(node, region):
                with graph.inserting_after(node):
                    part = graph.call_function(sp_split, (node, *hidden.position(node, False), self.row))
                node.replace_all_uses_with(part, delete_user_cb=lambda user: user is not part)
                self.sharded.add(part)
        for node in list(graph.nodes):
            if node.op == "call_function" and node not in self.sharded and not is_size_node(node):
                self.visit(node, region)
        for value in [o for o in graph.output_node().args[0] if isinstance(o, fx.Node) and o in self.sharded]:
            with graph.inserting_before(graph.output_node()):
                whole = graph.call_function(sp_gather, (value, *hidden.position(value, True), self.row, False))
            graph.output_node().replace_input_with(value, whole)

    def visit(self, node: fx.Node, region: set[fx.Node]) -> None:
        graph, hidden, inputs = self.graph, self.hidden, node.all_input_nodes
        if node.target in (tp_copy, tp_scatter) and inputs[0] in self.sharded:  # entering a column-parallel pair
            with graph.inserting_before(node):
                whole = graph.call_function(
                    sp_gather, (inputs[0], *hidden.position(inputs[0], True), self.row, node.target is tp_copy)
                )
            if node.target is tp_copy:
                node.replace_all_uses_with(whole)
                graph.erase_node(node)
            else:
                node.replace_input_with(inputs[0], whole)
        elif node.target is tp_reduce:  # leaving a row-parallel projection: its partial sums, reduce-scattered
            where = hidden.position(inputs[0], False)
            if where is None:
                _refuse(self.what, inputs[0], "ends a row-parallel projection on other features than the hidden ones")
            with graph.inserting_before(node):
                part = graph.call_function(sp_reduce_scatter, (inputs[0], *where, self.row))
            node.replace_all_uses_with(part)
            graph.erase_node(node)
            self.sharded.add(part)
        elif any(a in self.sharded for a in inputs):
            self.on_blocks(node, region)

    def on_blocks(self, node: fx.Node, region: set[fx.Node]) -> None:
        """``node`` reads feature blocks outside the tensor-parallel pairs."""
        graph, hidden = self.graph, self.hidden
        where = hidden.position(node.args[0], True) if isinstance(node.args[0], fx.Node) else None
        if node in region or param_matmul(self.gm, node) or node.target in MATMULS:
            _refuse(self.what, node, "would multiply along the hidden features that the grid's row splits")
        if node.target is aten.layer_norm.default:
            x, shape, *rest = node.args
            weight, bias, eps = (list(rest) + [None, None, 1e-5])[:3]
            if where is None or where[0] < _ndim(x) - len(shape):
                _refuse(self.what, node, "normalises over dimensions without the split features")
            local = list(hidden.local_sizes(x)[-len(shape) :])
            params = [self.split(p, node) if isinstance(p, fx.Node) else p for p in (weight, bias)]
            with graph.inserting_before(node):
                normed = graph.call_function(row_layer_norm, (x, local, *params, eps, self.row))
            node.replace_all_uses_with(normed)
            graph.erase_node(node)
            self.sharded.add(normed)
            return
        if node.target in REDUCTIONS and where is not None and where[0] in _reduced_dims(node):
            if node.target not in ROW_REDUCTIONS or len(where[1]) != 1:
                _refuse(self.what, node, "reduces over the hidden features in a way a row cannot split")
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            fn = row_mean if node.target is aten.mean.dim else row_total
            with graph.inserting_before(node):
                total = graph.call_function(
                    fn, (node.args[0], _reduced_dims(node), keepdim, self.row, node.kwargs.get("dtype"))
                )
            node.replace_all_uses_with(total)
            graph.erase_node(node)
            return  # the total is whole on every rank of the row
        for arg in node.all_input_nodes:  # whole values (parameters too) meeting blocks: this rank's slice
            if arg not in self.sharded and _is_float(arg) and self.whole_position(arg):
                node.replace_input_with(arg, self.split(arg, node))
        self.sharded.add(node)
        if node.target in VIEWS | {aten.expand.default} and hidden.dims(node) is not None:
            node.args = (
                node.args[0],
                rewrite_sizes(node.args[1], hidden.local_sizes(node), list(node.meta["val"].shape)),
                *node.args[2:],
            )


def _block_parameters(gm: fx.GraphModule, cfg: GridConfig, result: GridResult) -> None:
    """Step 3: every parameter split over the column group, gathered before use (``grid_param``)."""
    groups, q = cfg.groups, cfg.q
    column_index = groups.column.index(cfg.rank)
    records = dict(layer_meta(gm).shards)
    for node in list(gm.graph.find_nodes(op="get_attr")):
        param = get_attr_path(gm, node.target)
        if not isinstance(param, nn.Parameter):
            continue
        record = records.get(node.target)
        candidates = [d for d in range(param.dim()) if record is None or d != record.dim]
        dim = next((d for d in candidates if param.shape[d] % q == 0), None)
        if dim is not None:
            block = param.detach().chunk(q, dim)[column_index].clone().contiguous()
            set_attr_path(gm, node.target, nn.Parameter(block, requires_grad=param.requires_grad))
            cut = (dim, (q, param.shape[dim] // q), ((column_index, 1), None))
            full_shape = tuple(record.full_shape) if record else tuple(param.shape)
            records[node.target] = (
                dataclasses.replace(
                    record, extra=(*record.extra, cut), replicas=record.replicas * len(groups.depth), ranks=groups.grid
                )
                if record
                else ShardRecord(node.target, full_shape, *cut, replicas=q * len(groups.depth), ranks=groups.grid)
            )
            result.sharded.append(node.target)
        elif record is not None:  # a row shard that does not split further: whole over the column
            records[node.target] = dataclasses.replace(
                record, replicas=record.replicas * q * len(groups.depth), ranks=groups.grid
            )
        with gm.graph.inserting_after(node):
            gathered = gm.graph.call_function(grid_param, (node, dim, groups.column, groups.depth))
        node.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
    set_layer_meta(gm, shards=records)


def grid_parallel(gm: fx.GraphModule, cfg: GridConfig, layer_name: str = "layer") -> GridResult:
    """Requires: an ATen-level layer GraphModule with ``meta["val"]``, at the layer's local batch (its row's
    samples), full parameters. Ensures: ``gm`` rewritten for global rank ``cfg.rank`` of the grid (see the
    module docstring): parameters held as blocks (each with a ShardRecord over the grid), feature blocks inside,
    whole features on its inputs and outputs. Raises PlanError naming what the grid cannot split."""
    result = GridResult(gm)
    hidden = _hidden(gm, cfg, layer_name)  # before the projections are rewritten
    row_rank = cfg.groups.row.index(cfg.rank)
    tensor_parallel(gm, TPConfig(cfg.q, row_rank, cfg.groups.row, strict=True), layer_name)
    rewrite = _Rewrite(gm, cfg, hidden, layer_name)
    rewrite.run(tp_region(gm))
    _block_parameters(gm, cfg, result)
    mark_sharded(rewrite.sharded)
    gm.graph.lint()
    gm.recompile()
    rewritten_meta(gm, f"{layer_name}: {cfg.q}×{cfg.q} grid tensor parallelism", REMEDY)
    return result
