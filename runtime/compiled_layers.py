"""Regional compilation: each kind of layer graph compiled once with ``torch.compile`` and shared by every
layer of a stage that has that graph.

A layer's GraphModule reads its parameters and buffers through ``get_attr`` nodes whose names carry the
layer's index (``transformer_h_3_attn_c_attn_weight``), so two blocks of one type have different code and
``torch.compile`` would trace and compile each on its own. Here the first layer with a given graph (its
*signature*: ops, targets and how nodes feed each other, names aside) becomes the template of a function
``compiled(tensors, *inputs)`` that runs the template with ``tensors`` in place of its parameters and
buffers (``torch.func.functional_call``); every layer with that signature calls it with its own tensors,
read at call time, so that FSDP2's gathered parameters and tensor-parallel shards are the ones used. The
layer stays the module the runtime knows: its hooks (FSDP2's gathers, checkpointing) run as before; only
its ``forward`` changes.

Random draws (dropout) use the eager generators (inductor's ``fallback_random``), so that masks follow the
layer seeds of ``passes.lower.graph.random_streams`` exactly as in eager mode. Collectives inside a layer
(tensor parallelism) split its graph where dynamo cannot trace them: correct, if less fused.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.fx_utils import LAYER_COMPILE_OPTIONS, get_attr_path
from galvatron_fx.passes.lower.stage import StageModule, unwrap


def _signature(gm: fx.GraphModule) -> str:
    """The graph's structure without its names: equal for layers that compute alike on like tensors."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    rows = []
    for node in gm.graph.nodes:
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        value = node.meta.get("val")
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        target = None if node.op in ("get_attr", "placeholder") else str(node.target)
        rows.append(f"{node.op} {target} {args} {shape}")
    return "\n".join(rows)


def _attr_targets(gm: fx.GraphModule) -> list[str]:
    return list(dict.fromkeys(node.target for node in gm.graph.find_nodes(op="get_attr")))


class _Compiled:
    """One compiled function of a template layer; ``targets``: its tensor attributes, in graph order."""

    def __init__(self, template: fx.GraphModule):
        self.template, self.targets = template, _attr_targets(template)
        # the template's own forward compiled: its code is the template's alone, so dynamo keeps one cache
        # entry per template (a shared wrapper function would pile every template onto one cache, whose
        # recompile limit then sends the rest back to eager)
        template.forward = torch.compile(template.forward, options=LAYER_COMPILE_OPTIONS)

    def fn(self, tensors: dict[str, torch.Tensor], *inputs):
        return torch.func.functional_call(self.template, tensors, inputs)

    def bind(self, layer: fx.GraphModule) -> None:
        """Make ``layer`` (with the template's signature) run the compiled function on its own tensors."""
        own_names = dict(zip(self.targets, _attr_targets(layer)))  # the template's name → this layer's

        def forward(*inputs):
            tensors = {name: get_attr_path(layer, own) for name, own in own_names.items()}
            return self.fn(tensors, *inputs)

        layer.forward = forward


def compile_layers(stage: StageModule) -> int:
    """Requires: ``stage`` lowered and wrapped for data parallelism. Ensures: every layer runs a compiled
    function shared with the stage's other layers of the same graph. Returns how many functions there are."""
    shared: dict[str, _Compiled] = {}
    for layer in stage.stage_layers:
        module = unwrap(stage.layers[layer.name])
        signature = _signature(module)
        if signature not in shared:
            shared[signature] = _Compiled(_template_of(module))
        shared[signature].bind(module)
    return len(shared)


def _template_of(module: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with ``module``'s graph and its tensors under the same names: ``functional_call``
    replaces them on every call, so the layers' own modules (and their hooks) are never entered."""
    holder = nn.Module()
    for target in _attr_targets(module):
        value = get_attr_path(module, target)
        *path, name = target.split(".")
        owner = holder
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(name, value.detach(), persistent=False)
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    return fx.GraphModule(holder, graph)
