"""3D grid tensor parallelism (``tp_mode`` 3d, q×q×q ranks) in a layer's graph: ``grid_parallel``'s feature split
over the row, with the samples moving at the Megatron pairs (see ``CubeRewrite``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.fx_utils import get_attr_path, set_attr_path
from galvatron_fx.passes.analysis.batch_dim import is_size_node
from galvatron_fx.passes.lower.graph.grid_rewrite import FeatureRewrite, GridConfig, refuse
from galvatron_fx.passes.lower.graph.tracked_factor import TrackedFactor
from galvatron_fx.passes.lower.ops.collectives import (
    autocast_cast,
    sp_gather,
    sp_reduce_scatter,
    tp_copy,
    tp_reduce,
    tp_scatter,
)
from galvatron_fx.program import layer_meta, set_layer_meta

aten = torch.ops.aten


class CubeRewrite(FeatureRewrite):
    """3D: ``FeatureRewrite``, except that at the pairs samples move instead of features. A projection's input
    keeps its features split over the row; its samples are all-gathered over the pairs before it (``sp_gather``
    along the batch), its weight is cut along the row too (contraction for a column-parallel projection, output
    for a row-parallel one), and its partial sums are reduce-scattered along the samples (over the row after a
    column-parallel projection, over the pairs after a row-parallel one), so the layouts rotate and come back:
    inside the pairs a rank holds other samples than outside them, of the same count."""

    def __init__(self, gm, cfg: GridConfig, hidden: TrackedFactor, rows: TrackedFactor, projections, layer_name):
        super().__init__(gm, cfg, hidden, layer_name)
        self.rows, self.pairs, self.projections = rows, cfg.groups.pairs, projections
        self.sinks = {n for n in projections if any(u.target is tp_reduce for u in n.users)}
        self.row_index = cfg.groups.row.index(cfg.rank)
        self.root_biases: set[str] = set()
        self.moved: set[fx.Node] = set()  # values this rewrite made: samples already where the pairs want them

    def samples(self, node: fx.Node, gathered: bool = False):
        """Where ``node`` carries the samples (their count over the pairs' block when ``gathered``)."""
        where = self.rows.position(node, False)
        if where is None:
            refuse(self.what, node, "carries no sample dimension for the 3D grid to move")
        dim, sizes, index = where
        return dim, tuple(n * (self.cfg.q if gathered and i == index else 1) for i, n in enumerate(sizes)), index

    def cut(self, weight: fx.Node, dim: int) -> None:
        """This rank's block of ``weight`` along ``dim`` over the row (recorded as a further cut)."""
        param, q = get_attr_path(self.gm, weight.target), self.cfg.q
        block = param.detach().chunk(q, dim)[self.row_index].clone().contiguous()
        set_attr_path(self.gm, weight.target, nn.Parameter(block, requires_grad=param.requires_grad))
        records = dict(layer_meta(self.gm).shards)
        record, cut = records[weight.target], (dim, (q, param.shape[dim] // q), ((self.row_index, 1), None))
        records[weight.target] = dataclasses.replace(record, extra=(*record.extra, cut))
        set_layer_meta(self.gm, shards=records)

    def visit(self, node: fx.Node, region: set[fx.Node]) -> None:
        inputs = node.all_input_nodes
        if node in self.sinks:  # a row-parallel projection: the samples of the pairs' block first
            x, weight, _, _, w_out = self.projections[node]
            with self.graph.inserting_before(node):
                block = self.graph.call_function(sp_gather, (x, *self.samples(x), self.row, True, True))
            node.replace_input_with(x, block)
            self.moved.add(block)
            self.cut(weight, w_out)
            return
        entering = node.target in (tp_copy, tp_scatter) and inputs[0] in self.sharded
        if node in region and node not in self.projections and not entering:  # a whole value of this rank's
            for arg in inputs:  # samples cannot meet the pairs, whose rows are other samples
                outside = arg not in region and arg not in self.moved and arg.op != "get_attr"
                if outside and not is_size_node(arg) and self.rows.position(arg, False):
                    refuse(self.what, node, f"reads {arg.name}, a value of the layer's samples, inside the pairs")
        super().visit(node, region)

    def enter_pair(self, node: fx.Node) -> None:
        graph, value = self.graph, node.all_input_nodes[0]
        roots = list(node.users)
        if node.target is tp_scatter or not all(root in self.projections for root in roots):
            refuse(self.what, node, "brings split features into the pairs other than through a projection")
        with graph.inserting_before(node):
            block = graph.call_function(sp_gather, (value, *self.samples(value), self.pairs, True, True))
        node.replace_all_uses_with(block)
        graph.erase_node(node)
        self.moved.add(block)
        for root in roots:
            self.finish_root(root, block)

    def finish_root(self, root: fx.Node, block: fx.Node) -> None:
        """A column-parallel projection on the block's samples and this rank's features: partial sums over the
        row, reduce-scattered along the samples, then its bias."""
        graph = self.graph
        _, weight, bias, w_in, _ = self.projections[root]
        self.cut(weight, w_in)
        if bias is not None:  # added once, after the sum
            bias = root.args[0] if root.target is aten.addmm.default else root.args[2]
            if root.target is aten.addmm.default:
                root.target, root.args = aten.mm.default, (root.args[1], root.args[2])
            else:
                root.args, root.kwargs = root.args[:2], {}
            self.root_biases.add(self.projections[root][2].target)
        with graph.inserting_after(root):
            out = part = graph.call_function(sp_reduce_scatter, (root, *self.samples(block, True), self.row))
        if bias is not None:  # in the dtype the projection computed in, as its addmm would add it
            with graph.inserting_after(part):
                cast = graph.call_function(autocast_cast, (bias,))
            with graph.inserting_after(cast):
                out = graph.call_function(aten.add.Tensor, (part, cast))
        root.replace_all_uses_with(out, delete_user_cb=lambda user: user is not part)
        self.moved |= {part, cast, out} if bias is not None else {part, out}

    def leave_pair(self, node: fx.Node) -> None:
        sink = node.all_input_nodes[0]
        with self.graph.inserting_before(node):
            part = self.graph.call_function(sp_reduce_scatter, (sink, *self.samples(sink.args[0], True), self.pairs))
        node.replace_all_uses_with(part)
        self.graph.erase_node(node)
        self.sharded.add(part)  # the sink's output features were cut over the row

    def gradient_sum(self, target: str) -> tuple[tuple[int, ...], int]:
        """Who else holds a parameter's block for other samples, and the mean's divisor (see module docstring)."""
        q = self.cfg.q
        if target in {info[1].target for info in self.projections.values()}:
            return (), q * q  # the pairs' block of samples already sums over the pairs
        return (self.row if target in self.root_biases else self.pairs), q * q
