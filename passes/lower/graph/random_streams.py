"""Random ops under parallelism, with Megatron's semantics: ranks that hold the same value draw the same random
numbers for it; ranks that hold different shards of a value draw independent ones.

Each layer starts from a seed that depends on the run's seed, the step, the micro-batch, the layer and the block
of samples the rank holds under the layer's layout (``layer_seed``): the ranks of a tensor-parallel group hold
the same samples, so they start alike, and nothing depends on the pipeline division. Every random op of a
lowered layer graph (dropout, attention with dropout, ``rand``...) then runs as ``in_stream(op, stream, ...)``:
it takes one number from the CPU generator (the same on every rank of the group), seeds the generators from
it and its ``stream``, runs, and seeds them again from the number alone, so the ops after it see the same
state on every rank. ``stream`` is 0 for a value every rank of the group holds whole (the residual stream
after a row-parallel all-reduce), ``1 + tp index`` for a shard (attention heads, MLP columns, a sequence
shard under Megatron-SP or Ulysses): lowering passes mark shards with ``mark_sharded``.

Recomputation (activation checkpointing) restores the generators' state, and so draws the same masks.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from galvatron_fx.passes.lower.ops.random import in_stream
from galvatron_fx.program import node_meta, set_node_meta

aten = torch.ops.aten


def mark_sharded(nodes: Iterable[fx.Node]) -> None:
    """Record that each of ``nodes`` holds one rank's shard (its random ops draw a stream of their own)."""
    for node in nodes:
        set_node_meta(node, sharded=True)


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers when it runs (dropout with p > 0 in training, ``rand``...)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded not in node.target.tags:
        return False
    if node.target is aten.dropout.default:
        return bool(node.args[1]) and bool(node.args[2])
    if node.target is aten.scaled_dot_product_attention.default:
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return bool(p)
    return True


def assign_streams(gm: fx.GraphModule, shard_stream: int) -> int:
    """Run every random op of ``gm`` through ``in_stream``: stream ``shard_stream`` where it reads or makes a
    shard, 0 elsewhere. Returns how many ops were rewritten."""
    count = 0
    for node in gm.graph.nodes:
        if not is_random(node):
            continue
        sharded = node_meta(node).sharded or any(node_meta(a).sharded for a in node.all_input_nodes)
        node.args = (node.target, shard_stream if sharded else 0, *node.args)
        node.target = in_stream
        count += 1
    if count:
        gm.recompile()
    return count
