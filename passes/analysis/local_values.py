"""Values each layer rebuilds from what it already has, instead of receiving them from an earlier layer.

A value is *rebuildable* when it depends on no parameter and on no activation, only on the batch's inputs
(which every pipeline stage receives from the trainer), buffers, constants and sizes, and draws nothing at
random: the batch size read from a tensor (``sym_size``), the position ids, the rotary tables of LLaMA-like
models, a padding mask built from the batch's attention mask. ``localize_values`` gives every layer that
reads one its own copy of the computation, so that such values never cross a layer boundary or a pipeline
cut: a cut sends the hidden states alone. A size read from a tensor of another layer is read from a batched
tensor the layer has itself (the batch is a symbol: ``passes.analysis.batch_dim``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.fx_utils import get_attr_path
from galvatron_fx.passes.analysis.batch_dim import is_size_node
from galvatron_fx.program import node_meta

aten = torch.ops.aten


def _deterministic(node: fx.Node) -> bool:
    target = node.target
    return not (isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags)


class Rebuildable:
    """Which nodes of ``gm`` are rebuildable (see the module docstring), memoised."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.known = gm, {}

    def __call__(self, node: fx.Node) -> bool:
        if node not in self.known:
            if node.op == "placeholder":
                self.known[node] = True
            elif node.op == "get_attr":
                self.known[node] = not isinstance(get_attr_path(self.gm, node.target), nn.Parameter)
            elif node.op == "call_function" and is_size_node(node):
                self.known[node] = True
            else:
                self.known[node] = (
                    node.op == "call_function"
                    and _deterministic(node)
                    and all(self(arg) for arg in node.all_input_nodes)
                )
        return self.known[node]


def localize_values(gm: fx.GraphModule, segments) -> None:
    """Requires: ``segments`` (``discover_layers``) covering the call nodes in order, batched nodes marked.
    Ensures: no segment reads a rebuildable value another segment computes: each gets its own copy of the
    computation, placed before its first node; copies left without users are removed."""
    rebuildable = Rebuildable(gm)
    owner = {node: i for i, segment in enumerate(segments) for node in segment.nodes}
    for i, segment in enumerate(segments):
        if not segment.nodes:
            continue
        copies: dict[fx.Node, fx.Node] = {}
        first = segment.nodes[0]  # copies go before it, in the order they are made (arguments first)
        for node in list(segment.nodes):
            for used in node.all_input_nodes:
                if used in owner and owner[used] != i and rebuildable(used):
                    node.replace_input_with(used, _copy(gm.graph, used, first, segment, owner, i, copies))
    for segment in segments:  # what only other segments read is now unused
        for node in reversed(list(segment.nodes)):
            if not node.users and rebuildable(node) and node.op == "call_function":
                gm.graph.erase_node(node)
                segment.nodes.remove(node)
    gm.graph.lint()
    gm.recompile()


def _copy(graph: fx.Graph, value: fx.Node, first: fx.Node, segment, owner, index: int, copies: dict) -> fx.Node:
    """``value``'s computation copied into ``segment`` (placeholders, buffers and the segment's own nodes are
    read as they are)."""
    if value not in copies:
        if value not in owner or owner[value] == index:
            return value
        if value.target is aten.sym_size.int:
            source, dim = value.args
            if dim == 0 and node_meta(source).batched:
                source = _batched_source(segment, owner, index) or source
            args, kwargs = (source, dim), {}
        else:
            mapped = lambda arg: _copy(graph, arg, first, segment, owner, index, copies)  # noqa: E731
            args, kwargs = fx.node.map_arg(value.args, mapped), fx.node.map_arg(value.kwargs, mapped)
        with graph.inserting_before(first):
            copy = graph.call_function(value.target, args, kwargs)
        copy.meta = {key: item for key, item in value.meta.items() if key != "nn_module_stack"}
        segment.nodes.insert(segment.nodes.index(first), copy)
        owner[copy] = index
        copies[value] = copy
    return copies[value]


def _batched_source(segment, owner, index: int) -> fx.Node | None:
    """A batched tensor the segment reads from outside (it is a placeholder of the segment's graph)."""
    for node in segment.nodes:
        for used in node.all_input_nodes:
            if owner.get(used, -1) != index and node_meta(used).batched and used.op != "get_attr":
                return used
    return None
