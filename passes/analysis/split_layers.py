"""Split the flat graph into one GraphModule per layer, type the layers, and find their boundaries.

Requires: segments from ``discover_layers`` covering every call node once, in execution order, and
``meta["val"]`` on nodes (torch.export puts it there). Ensures: each ``Layer`` has a GraphModule
whose placeholders are the values it reads (graph inputs or earlier layers' outputs, by node name)
and whose outputs are the values later layers or the graph's output read; its parameters keep the
user's qualified names, shared with the flat graph. Layers with structurally identical graphs and
equal parameter shapes share a ``layer_type``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.fx as fx

from galvatron_fx.fx_utils import get_attr_path
from galvatron_fx.passes.analysis.discover_layers import Segment
from galvatron_fx.program import BLOCK, TRANSITION, Layer, TensorSpec, node_meta


def tensor_spec(node: fx.Node) -> TensorSpec | None:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return TensorSpec(node.name, tuple(int(s) for s in value.shape), value.dtype, node_meta(node).batched)


def _graph_output_names(graph: fx.Graph) -> set[str]:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    return {n.name for n in output.all_input_nodes}


def build_layer_module(
    root: fx.GraphModule, nodes: list[fx.Node], output_names: list[str]
) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule computing ``nodes``; returns it and the names of its placeholders, in order."""
    inside = set(nodes)
    external = list(
        dict.fromkeys(
            used for node in nodes for used in node.all_input_nodes if used not in inside and used.op != "get_attr"
        )
    )
    by_name = {n.name: n for n in nodes}
    external += [
        _find(root, name) for name in output_names if name not in by_name and _find(root, name) not in external
    ]
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    for value in external:
        remap[value] = graph.placeholder(value.name)
        remap[value].meta = dict(value.meta)
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in remap:  # parameters and buffers, fetched where first used
                remap[used] = graph.get_attr(used.target)
        remap[node] = graph.node_copy(node, lambda used: remap[used])
    graph.output(tuple(remap[by_name.get(name) or _find(root, name)] for name in output_names))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="LayerModule"), [v.name for v in external]


def _find(root: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in root.graph.nodes if n.name == name)


def structural_signature(module: fx.GraphModule) -> str:
    """A hash of the layer's graph that ignores node names but not ops, constants, shapes or parameters."""
    index: dict[fx.Node, int] = {}
    items: list[str] = []

    def encode(arg: Any) -> str:
        if isinstance(arg, fx.Node):
            return f"%{index[arg]}"
        if isinstance(arg, (list, tuple)):
            return "[" + ",".join(encode(a) for a in arg) + "]"
        if isinstance(arg, dict):
            return "{" + ",".join(f"{k}:{encode(v)}" for k, v in sorted(arg.items())) + "}"
        return repr(arg)

    for i, node in enumerate(module.graph.nodes):
        index[node] = i
        value = node.meta.get("val")
        shape = (tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else type(value).__name__
        if node.op == "placeholder":
            items.append(f"placeholder {shape}")
        elif node.op == "get_attr":
            tensor = (
                module.get_parameter(node.target)
                if _is_parameter(module, node.target)
                else get_attr_path(module, node.target)
            )
            items.append(f"get_attr {tuple(tensor.shape)} {tensor.dtype} {isinstance(tensor, torch.nn.Parameter)}")
        else:
            items.append(f"{node.op} {node.target} {encode(node.args)} {encode(node.kwargs)} {shape}")
    return hashlib.sha1("\n".join(items).encode()).hexdigest()


def _is_parameter(module: torch.nn.Module, target: str) -> bool:
    return isinstance(get_attr_path(module, target), torch.nn.Parameter)


def split_layers(root: fx.GraphModule, segments: list[Segment]) -> list[Layer]:
    """Build the layer table's skeleton (modules, types, boundaries); statistics come later."""
    owner = {node.name: i for i, segment in enumerate(segments) for node in segment.nodes}
    graph_outputs = _graph_output_names(root.graph)
    # last_use[name] = index of the last segment that reads the value (len(segments) for graph outputs)
    last_use: dict[str, int] = {}
    for i, segment in enumerate(segments):
        for node in segment.nodes:
            for used in node.all_input_nodes:
                last_use[used.name] = max(last_use.get(used.name, -1), i)
    for name in graph_outputs:
        last_use[name] = len(segments)

    nodes_by_name = {n.name: n for n in root.graph.nodes}
    layers: list[Layer] = []
    for i, segment in enumerate(segments):
        produced = [n.name for n in segment.nodes if last_use.get(n.name, -1) > i]
        module, input_names = build_layer_module(root, segment.nodes, produced)
        param_names = tuple(
            dict.fromkeys(
                n.target for n in module.graph.nodes if n.op == "get_attr" and _is_parameter(module, n.target)
            )
        )
        live_after = [name for name, last in last_use.items() if last > i and owner.get(name, i + 1) <= i]
        layers.append(
            Layer(
                index=i,
                kind=segment.kind,
                module_path=segment.module_path,
                layer_type=segment.kind,
                node_names=tuple(n.name for n in segment.nodes),
                param_names=param_names,
                inputs=_specs(nodes_by_name, [n for n in input_names if n in owner]),
                boundary_out=_specs(nodes_by_name, live_after),
                module=module,
                input_names=tuple(input_names),
                output_names=tuple(produced),
            )
        )
    _name_layer_types(layers, segments)
    return layers


def _specs(nodes_by_name: dict[str, fx.Node], names: list[str]) -> tuple[TensorSpec, ...]:
    specs = (tensor_spec(nodes_by_name[name]) for name in names)
    return tuple(spec for spec in specs if spec is not None)


def _name_layer_types(layers: list[Layer], segments: list[Segment]) -> None:
    """Body layers get their module class as type, numbered when one class has several structures."""
    structures: dict[str, list[str]] = {}  # class name → its distinct signatures, first seen first
    named = []
    for layer, segment in zip(layers, segments):
        if layer.kind in (BLOCK, TRANSITION):
            cls = segment.module_class if layer.kind == BLOCK else "Transition"
            signature = structural_signature(layer.module)
            seen = structures.setdefault(cls, [])
            if signature not in seen:
                seen.append(signature)
            named.append((layer, cls, seen.index(signature)))
    for layer, cls, number in named:
        layer.layer_type = cls if len(structures[cls]) == 1 else f"{cls}.{number}"
