"""Small helpers on FX GraphModules that every pass shares: dotted attribute paths, copies of layer graphs,
and how a layer graph is compiled."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx
import torch.nn as nn

# torch.compile options of a layer graph, wherever one runs (training, profiling): random draws (dropout) on
# the eager generators, so that masks follow the layer seeds as they do in eager mode
LAYER_COMPILE_OPTIONS = {"fallback_random": True}


def get_attr_path(module: nn.Module, target: str) -> Any:
    """``module.a.b.c`` for ``target = "a.b.c"`` (a ``get_attr`` node's target)."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def set_attr_path(module: nn.Module, target: str, value: Any) -> None:
    """Set ``module.a.b.c = value`` for ``target = "a.b.c"``."""
    *path, leaf = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, value)


def copy_layer_modules(modules: Sequence[fx.GraphModule]) -> list[fx.GraphModule]:
    """Copies with their own graphs and parameters; parameters shared between the originals stay shared
    between the copies (a tied embedding and head), so a rewrite of one copy never touches the originals."""
    clones: dict[int, Any] = {}
    return [_copy_graph_module(module, clones) for module in modules]


def _copy_graph_module(module: fx.GraphModule, clones: dict[int, Any]) -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    attrs = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = get_attr_path(module, node.target)
        if id(value) not in clones:
            if isinstance(value, fx.GraphModule):  # a higher-order op's body (e.g. a no-grad region)
                clones[id(value)] = _copy_graph_module(value, clones)
            elif isinstance(value, nn.Parameter):
                clones[id(value)] = nn.Parameter(value.detach().clone(), value.requires_grad)
            else:
                clones[id(value)] = value.detach().clone() if hasattr(value, "detach") else value
        attrs[node.target] = clones[id(value)]
    return fx.GraphModule(attrs, graph, class_name=type(module).__name__)
