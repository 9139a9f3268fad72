"""The batch dimension: captured as a symbol, so that one Program runs at any batch size, 1 included.

``capture`` exports the model with a symbolic batch (``torch.export`` with a ``Dim`` on dim 0 of every batched
input). Views then read the batch from the tensor (``sym_size``) instead of baking in the example's size, so a
layer graph runs at whatever batch it is given. The passes here turn that export into what the rest of the
package reasons about:

- ``mark_batched``: every value whose dim 0 *is* the batch symbol is marked (``NodeMeta.batched``): exact,
  where comparing sizes would confuse a batch of 16 with a sequence of 16, and cannot see a batch of 1;
- ``concretize``: ``meta["val"]`` recomputed with the example's sizes, so analyses see plain shapes;
- ``set_batch``: a layer graph's metadata recomputed at another batch (lowering: each layer's local batch).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from galvatron_fx.passes.analysis.dim_tracking import refresh_meta
from galvatron_fx.program import node_meta, set_node_meta

aten = torch.ops.aten
_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.neg}


def mark_batched(gm: fx.GraphModule) -> None:
    """Requires: ``meta["val"]`` from an export with a symbolic batch. Ensures: ``node_meta(node).batched``
    is True exactly on the nodes whose value is a tensor with the batch symbol as dim 0."""
    symbol = _batch_symbol(gm)
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        batched = (
            symbol is not None and isinstance(value, torch.Tensor) and value.dim() > 0 and _is(value.shape[0], symbol)
        )
        set_node_meta(node, batched=bool(batched))


def mark_batched_by_size(gm: fx.GraphModule, batch_size: int) -> None:
    """A static capture has no batch symbol: values whose dim 0 has the batch's size count as batched."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            set_node_meta(node, batched=True)


def _batch_symbol(gm: fx.GraphModule):
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], torch.SymInt):
            return value.shape[0].node.expr
    return None


def _is(size: Any, symbol) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr == symbol


def concretize(gm: fx.GraphModule, example_inputs: list[Any]) -> None:
    """Requires: ``example_inputs`` for the placeholders, in order. Ensures: every ``meta["val"]`` holds the
    fake value computed at those inputs' sizes (no symbols left)."""
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(value, torch.Tensor):
            node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        else:
            node.meta["val"] = value
    refresh_meta(gm)


def is_size_node(node: fx.Node) -> bool:
    """A node computing an integer from tensor sizes: ``sym_size`` and arithmetic on such nodes."""
    if node.op != "call_function":
        return False
    if node.target is aten.sym_size.int:
        return True
    return node.target in _ARITHMETIC and any(isinstance(a, fx.Node) and is_size_node(a) for a in node.args)


def set_batch(gm: fx.GraphModule, batch: int) -> None:
    """Requires: a layer graph from a Program captured with a symbolic batch. Ensures: its batched placeholders
    hold ``batch`` samples and every ``meta["val"]`` is recomputed at that batch."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if node_meta(node).batched and isinstance(value, torch.Tensor):
            node.meta["val"] = torch.empty((batch, *value.shape[1:]), dtype=value.dtype, device="meta")
    refresh_meta(gm)
