"""The pieces of grid tensor parallelism (``grid_parallel``): the grid's configuration, the rewrite of a layer's
graph that splits the hidden features over the grid's row (2D and 2.5D; ``grid3d`` builds 3D on it), and the
parameters held as blocks over the grid's column (``block_parameters``)."""

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
from galvatron_fx.passes.analysis.dim_tracking import VIEWS, feeds_only_matmuls, param_matmul
from galvatron_fx.passes.lower.graph.sequence_parallel import REDUCTIONS, wants_shards
from galvatron_fx.passes.lower.graph.tensor_parallel import ShardRecord
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
from galvatron_fx.program import layer_meta, node_meta, set_layer_meta

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


def is_float(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def hidden_features(gm: fx.GraphModule, cfg: GridConfig, layer_name: str) -> TrackedFactor:
    """The hidden features (the last dim of the batched activation), which the grid's row splits."""
    sources = [
        n
        for n in gm.graph.find_nodes(op="placeholder")
        if n.name in cfg.batched and is_float(n) and n.meta["val"].dim() >= 2
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


def sample_rows(gm: fx.GraphModule, cfg: GridConfig, layer_name: str) -> TrackedFactor:
    """The samples (dim 0 of the batched activation), which a 3D grid moves between its groups."""
    sources = [n for n in gm.graph.find_nodes(op="placeholder") if n.name in cfg.batched and is_float(n)]
    rows = TrackedFactor(gm, sources, 0, cfg.q)
    if rows.cls is None:
        raise PlanError(f"{layer_name}: a 3D grid found no batched activation among its inputs", REMEDY)
    return rows


def ndim_of(node: fx.Node) -> int:
    """Dimensions of ``node``'s value; an inserted collective has its input's."""
    return _origin(node).meta["val"].dim()


def _origin(node: fx.Node) -> fx.Node:
    """The captured node an inserted collective stands for (its first input, followed until one has a value)."""
    while "val" not in node.meta and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _batched(node: fx.Node) -> bool:
    return node_meta(_origin(node)).batched


def _last_dim(node: fx.Node, where) -> bool:
    """Whether the hidden features are the whole last dimension of ``node`` (``where``: their position)."""
    return where is not None and where[0] == ndim_of(node) - 1 and len(where[1]) == 1


def refuse(layer_name: str, node: fx.Node, why: str):
    raise PlanError(f"{layer_name}: {node.name} ({node.target}) {why}", REMEDY)


def _reduced_dims(node: fx.Node) -> list[int]:
    ndim = ndim_of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(ndim))
    return [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]


class FeatureRewrite:
    """Step 2 of ``grid_parallel``'s docstring over one graph, in graph order: the hidden features split over the
    row outside the Megatron pairs, gathered into them and scattered out of them."""

    def __init__(self, gm: fx.GraphModule, cfg: GridConfig, hidden: TrackedFactor, layer_name: str):
        self.gm, self.graph, self.cfg, self.hidden, self.what = gm, gm.graph, cfg, hidden, layer_name
        self.row = cfg.groups.row
        self.sharded: set[fx.Node] = set()
        self.feature_inputs: set[str] = set()  # placeholders that arrive split along the features
        self.feature_outputs: list[bool] = []  # per output: leaves split along the features?

    def whole_position(self, value: fx.Node):
        """Where a whole value carries the hidden features: as the factor analysis says, or, for a value the
        analysis did not align (a bias added after a projection), a last dimension of the hidden size."""
        where = self.hidden.position(value, False)
        shape = value.meta["val"].shape if is_float(value) else ()
        if where is None and len(shape) and shape[-1] == self.hidden.length:
            where = (len(shape) - 1, (self.hidden.length,), 0)
        return where

    def split(self, value: fx.Node, before: fx.Node) -> fx.Node:
        """This rank's feature slice of a whole value (its gradient all-gathered back)."""
        with self.graph.inserting_before(before):
            return self.graph.call_function(sp_split, (value, *self.whole_position(value), self.row))

    def run(self, region: set[fx.Node]) -> None:
        """Inputs with the hidden features as their last dimension arrive split along them (the stage's layouts
        move them so), outputs leave so; other values with the features are split and gathered in the graph."""
        graph, hidden = self.graph, self.hidden
        for node in list(graph.find_nodes(op="placeholder")):
            where = hidden.position(node, False)
            if not (is_float(node) and where and wants_shards(node, region)):
                continue
            if node.name in self.cfg.batched and _last_dim(node, where):
                self.feature_inputs.add(node.name)
                self.sharded.add(node)
                continue
            with graph.inserting_after(node):
                part = graph.call_function(sp_split, (node, *where, self.row))
            node.replace_all_uses_with(part, delete_user_cb=lambda user: user is not part)
            self.sharded.add(part)
        for node in list(graph.nodes):
            if node.op == "call_function" and node not in self.sharded and not is_size_node(node):
                self.visit(node, region)
        outputs = list(graph.output_node().args[0])
        self.feature_outputs = [False] * len(outputs)
        for i, value in enumerate(outputs):
            if not (isinstance(value, fx.Node) and value in self.sharded):
                continue
            where = hidden.position(value, True)
            if _batched(value) and _last_dim(value, where):
                self.feature_outputs[i] = True
                continue
            with graph.inserting_before(graph.output_node()):
                whole = graph.call_function(sp_gather, (value, *where, self.row, False))
            graph.output_node().replace_input_with(value, whole)

    def local_placeholders(self) -> None:
        """The placeholders that arrive split hold this rank's features."""
        for node in self.graph.find_nodes(op="placeholder"):
            if node.name in self.feature_inputs:
                value = node.meta["val"]
                node.meta["val"] = torch.empty(
                    (*value.shape[:-1], value.shape[-1] // self.cfg.q), dtype=value.dtype, device="meta"
                )

    def visit(self, node: fx.Node, region: set[fx.Node]) -> None:
        inputs = node.all_input_nodes
        if node.target in (tp_copy, tp_scatter) and inputs[0] in self.sharded:
            self.enter_pair(node)
        elif node.target is tp_reduce:
            self.leave_pair(node)
        elif any(a in self.sharded for a in inputs):
            self.on_blocks(node, region)

    def enter_pair(self, node: fx.Node) -> None:
        """A value with split features enters a column-parallel projection: its features, all-gathered."""
        graph, value = self.graph, node.all_input_nodes[0]
        copy = node.target is tp_copy
        args = (value, *self.hidden.position(value, True), self.row, copy, copy and feeds_only_matmuls(node))
        with graph.inserting_before(node):
            whole = graph.call_function(sp_gather, args)
        if copy:
            node.replace_all_uses_with(whole)
            graph.erase_node(node)
        else:
            node.replace_input_with(value, whole)

    def leave_pair(self, node: fx.Node) -> None:
        """The partial sums of a row-parallel projection, reduce-scattered along the features."""
        partial = node.all_input_nodes[0]
        where = self.hidden.position(partial, False)
        if where is None:
            refuse(self.what, partial, "ends a row-parallel projection on other features than the hidden ones")
        with self.graph.inserting_before(node):
            part = self.graph.call_function(sp_reduce_scatter, (partial, *where, self.row))
        node.replace_all_uses_with(part)
        self.graph.erase_node(node)
        self.sharded.add(part)

    def on_blocks(self, node: fx.Node, region: set[fx.Node]) -> None:
        """``node`` reads feature blocks outside the tensor-parallel pairs."""
        graph, hidden = self.graph, self.hidden
        where = hidden.position(node.args[0], True) if isinstance(node.args[0], fx.Node) else None
        if node in region or param_matmul(self.gm, node) or node.target in MATMULS:
            refuse(self.what, node, "would multiply along the hidden features that the grid's row splits")
        if node.target is aten.layer_norm.default:
            x, shape, *rest = node.args
            weight, bias, eps = (list(rest) + [None, None, 1e-5])[:3]
            if where is None or where[0] < ndim_of(x) - len(shape):
                refuse(self.what, node, "normalises over dimensions without the split features")
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
                refuse(self.what, node, "reduces over the hidden features in a way a row cannot split")
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
            if arg not in self.sharded and is_float(arg) and self.whole_position(arg):
                node.replace_input_with(arg, self.split(arg, node))
        self.sharded.add(node)
        if node.target in VIEWS | {aten.expand.default} and hidden.dims(node) is not None:
            node.args = (
                node.args[0],
                rewrite_sizes(node.args[1], hidden.local_sizes(node), list(node.meta["val"].shape)),
                *node.args[2:],
            )


def block_parameters(gm: fx.GraphModule, cfg: GridConfig, gradient_sum) -> list[str]:
    """Step 3: every parameter split over the column group, gathered before use (``grid_param``); its gradient
    also summed over ``gradient_sum(target)[0]`` and divided by ``[1]``. Returns the parameters cut."""
    groups, q = cfg.groups, cfg.q
    column_index = groups.column.index(cfg.rank)
    records, cut_names = dict(layer_meta(gm).shards), []
    for node in list(gm.graph.find_nodes(op="get_attr")):
        param = get_attr_path(gm, node.target)
        if not isinstance(param, nn.Parameter):
            continue
        record = records.get(node.target)
        cut_dims = {entry[0] for entry in record.entries} if record else set()
        order = [d for d in range(param.dim()) if d not in cut_dims] + sorted(cut_dims)  # SUMMA's blocks first
        dim = next((d for d in order if param.shape[d] % q == 0), None)
        if dim is not None:
            block = param.detach().chunk(q, dim)[column_index].clone().contiguous()
            set_attr_path(gm, node.target, nn.Parameter(block, requires_grad=param.requires_grad))
            cut = (dim, (q, param.shape[dim] // q), ((column_index, 1), None))
            records[node.target] = (
                dataclasses.replace(record, extra=(*record.extra, cut))
                if record
                else ShardRecord(node.target, tuple(param.shape), *cut, replicas=0)  # counted below
            )
            cut_names.append(node.target)
        also, divisor = gradient_sum(node.target)
        into_matmul = feeds_only_matmuls(node)
        with gm.graph.inserting_after(node):
            gathered = gm.graph.call_function(grid_param, (node, dim, groups.column, also, divisor, into_matmul))
        node.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
    for name, record in records.items():  # every shard is now a block of the grid, held by grid / blocks ranks
        fresh = record.replicas == 0  # cut by the grid alone; else first by the 1D pairs (record.replicas of them)
        blocks = q ** len(record.entries) if fresh else len(groups.pairs) // record.replicas * q ** len(record.extra)
        records[name] = dataclasses.replace(record, ranks=groups.grid, replicas=len(groups.grid) // blocks)
    set_layer_meta(gm, shards=records)
    return cut_names
