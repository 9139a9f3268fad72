"""Activation layouts between layers, and the ``redistribute`` node that converts a value for a layer that
wants it in another layout.

A *layout* says which block of a micro-batch activation a rank holds: the batch is split into ``dp`` chunks
(the rank's data-parallel index picks one) and, under sequence parallelism, the sequence into ``tp`` chunks
(its tp index picks one), or around a grid layer the features (the last dimension) into its rows' ``q`` chunks;
ranks of a tp group hold the same batch chunk. Every activation stays in the layout
of the layer that produced it; the layer that reads it converts it on entry: one all-to-all over the stage's
ranks in which each rank receives exactly the blocks it lacks, from a rank that holds them (itself when it
can), so the fewest bytes move (``exchange_plan``; the op is ``passes.lower.ops.redistribute``). Across a
pipeline cut the receiving rank gets the sender's block (same local index) and converts it the same way.

A layer with ``dp`` smaller than the stage's data split runs ``devices_per_stage / dp`` times a rank's own
samples: its parameters' gradients are scaled by ``dp / devices_per_stage`` (``scale_param_grads``) so that
averaging over its dp replicas gives the mean over the micro-batch like everywhere else.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from galvatron_fx.fx_utils import copy_layer_modules, get_attr_path
from galvatron_fx.parallel_dims import (
    PROLOGUE_AND_EPILOGUE,
    ParallelDims,
    activation_strategy,
    data_split,
    dp_index,
    end_layout,
    tp_index,
)
from galvatron_fx.passes.lower.graph.grid_parallel import GridConfig, grid_parallel
from galvatron_fx.passes.lower.graph.sequence_parallel import SPConfig, sequence_parallel
from galvatron_fx.passes.lower.ops.redistribute import redistribute, scale_grad
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import LayerMeta, Program, layer_meta, node_meta


@dataclass(frozen=True)
class Layout:
    """Batch in ``dp`` chunks; under sequence parallelism the sequence (dim 1), in a grid layer the features
    (the last dim) in ``tp`` chunks. ``block(local)`` = (batch chunk, sequence chunk, feature chunk)."""

    strategy: LayerStrategy
    seq_sharded: bool = False
    feature_sharded: bool = False

    @property
    def dp(self) -> int:
        return self.strategy.dp

    @property
    def seq(self) -> int:
        return self.strategy.tp if self.seq_sharded else 1

    @property
    def features(self) -> int:
        return self.strategy.tp if self.feature_sharded else 1

    @property
    def chunks(self) -> tuple[int, int, int]:
        return self.dp, self.seq, self.features

    def block(self, local: int) -> tuple[int, int, int]:
        tp = tp_index(self.strategy, local)
        return dp_index(self.strategy, local), tp if self.seq_sharded else 0, tp if self.feature_sharded else 0

    def same_blocks(self, other: "Layout", devices: int) -> bool:
        return self.chunks == other.chunks and all(self.block(item) == other.block(item) for item in range(devices))


def exchange_plan(src: Layout, dst: Layout, devices: int, me: int, lengths: tuple[int, int, int]):
    """This rank's part of the all-to-all turning ``src`` blocks into ``dst`` blocks of an activation whose batch,
    sequence and features have ``lengths``: ``sends`` (peer, (start, length) per axis) in its block's coordinates,
    ``recvs`` the same in the output block's."""
    units = tuple(max(a, b) for a, b in zip(src.chunks, dst.chunks))
    unit_lengths = tuple(n // u for n, u in zip(lengths, units))

    def unit_set(layout: Layout, local: int):
        per = [u // c for u, c in zip(units, layout.chunks)]
        b, s, f = (index * n for index, n in zip(layout.block(local), per))
        return [(b + i, s + j, f + k) for i in range(per[0]) for j in range(per[1]) for k in range(per[2])]

    def local_box(unit, layout: Layout, local: int):
        origin = [index * (n // c) for index, n, c in zip(layout.block(local), lengths, layout.chunks)]
        return tuple((u * n - o, n) for u, n, o in zip(unit, unit_lengths, origin))

    holders: dict[tuple, list[int]] = {}
    for local in range(devices):
        for unit in unit_set(src, local):
            holders.setdefault(unit, []).append(local)
    sends, recvs = [], []
    for dest in range(devices):
        for unit in unit_set(dst, dest):
            candidates = holders[unit]
            source = dest if dest in candidates else candidates[dest % len(candidates)]
            if source == me:
                sends.append((dest, local_box(unit, src, me)))
            if dest == me:
                recvs.append((source, local_box(unit, dst, me)))
    return tuple(sorted(sends)), tuple(sorted(recvs))


def scale_param_grads(gm: fx.GraphModule, factor: float) -> None:
    """Insert ``scale_grad`` after every parameter fetch of ``gm``."""
    if factor == 1:
        return
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if isinstance(get_attr_path(gm, node.target), torch.nn.Parameter):
            with gm.graph.inserting_after(node):
                scaled = gm.graph.call_function(scale_grad, (node, factor))
            node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.recompile()


def insert_redistribute(
    gm: fx.GraphModule,
    name: str,
    src: Layout,
    dst: Layout,
    devices: int,
    local: int,
    stage_ranks: tuple[int, ...],
    full_shape: tuple[int, ...],
) -> bool:
    """Convert placeholder ``name`` (whole: ``full_shape``) from ``src`` to ``dst`` on entry (its meta becomes
    the ``src`` block)."""
    if src.same_blocks(dst, devices):
        return False
    node = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == name)
    cut = (True, src.seq > 1 or dst.seq > 1, src.features > 1 or dst.features > 1)  # which axes move
    lengths = (full_shape[0], full_shape[1] if cut[1] else 1, full_shape[-1] if cut[2] else 1)
    forward = exchange_plan(src, dst, devices, local, lengths)
    backward = exchange_plan(dst, src, devices, local, lengths)
    value, out_block = node.meta["val"], block_shape(full_shape, dst)
    node.meta["val"] = torch.empty(block_shape(full_shape, src), dtype=value.dtype, device="meta")
    out_lengths = (out_block[0], out_block[1] if len(out_block) > 1 else 1, out_block[-1])
    with gm.graph.inserting_after(node):
        moved = gm.graph.call_function(redistribute, (node, forward, backward, stage_ranks, cut, out_lengths))
    node.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
    gm.recompile()
    return True


def block_shape(full_shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The shape of one rank's block of a value of ``full_shape`` in ``layout``."""
    shape = [full_shape[0] // layout.dp, *full_shape[1:]]
    if layout.seq > 1:
        shape[1] //= layout.seq
    if layout.features > 1:
        shape[-1] //= layout.features
    return tuple(shape)


def with_shape(spec, shape):
    return dataclasses.replace(spec, shape=tuple(shape))


# -- where every value of a Program lives under a plan ----------------------------------------------------------
def batched_names(program: Program) -> frozenset[str]:
    """Values of the Program whose dim 0 is the batch (captured as a symbol: ``passes.analysis.batch_dim``)."""
    names = {spec.name for layer in program.layers for spec in (*layer.inputs, *layer.boundary_out) if spec.batched}
    names |= {n.name for n in program.graph_module.graph.find_nodes(op="placeholder") if node_meta(n).batched}
    return frozenset(names)


def sp_config(
    dims: ParallelDims,
    strategy: LayerStrategy,
    rank: int,
    batched: frozenset[str],
    strict: bool = False,
    mode: str | None = None,
) -> SPConfig:
    """The sequence-parallel rewrite of a layer under ``strategy`` (in ``mode``, by default its ``sp``) for
    ``rank``."""
    ranks = dims.tp_group(strategy, rank)
    return SPConfig(mode or strategy.sp, strategy.tp, ranks.index(rank), ranks, batched, strict)


def vsp_config(plan: Plan, rank: int, batched: frozenset[str], strict: bool = False) -> SPConfig:
    """The vsp rewrite of the embedding and head for ``rank``: over its vtp group (``end_layout``)."""
    layout = end_layout(plan.embedding, plan.devices_per_stage)
    return sp_config(ParallelDims.of(plan), layout, rank, batched, strict, mode="vsp")


_LAYOUT_FLAGS: "weakref.WeakKeyDictionary[fx.GraphModule, dict]" = weakref.WeakKeyDictionary()


def sequence_flags(program: Program, plan: Plan, layer_index: int, strategy: LayerStrategy) -> LayerMeta:
    """Which inputs of Program layer ``layer_index`` arrive and which outputs leave sequence-sharded under
    ``strategy``, without lowering its stage (for values that cross a pipeline cut): the rewrite runs on a
    copy, once per process."""
    original = program.layers[layer_index].module
    mode = "vsp" if program.layers[layer_index].kind in PROLOGUE_AND_EPILOGUE else strategy.sp
    cache = _LAYOUT_FLAGS.setdefault(original, {})
    if (strategy, mode) not in cache:
        module = copy_layer_modules([original])[0]
        dims = ParallelDims.of(plan)  # any rank of the stage gives the same layout: rank 0
        config = sp_config(dims, strategy, 0, batched_names(program), mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sequence_parallel(module, config, f"layer{layer_index}")
        cache[strategy, mode] = layer_meta(module)
    return cache[strategy, mode]


def grid_flags(program: Program, plan: Plan, layer_index: int, strategy: LayerStrategy) -> LayerMeta:
    """Which inputs of body layer ``layer_index`` arrive and which outputs leave split along the features under
    a grid ``strategy``, without lowering its stage: the rewrite runs on a copy, once per process."""
    original = program.layers[layer_index].module
    cache = _LAYOUT_FLAGS.setdefault(original, {})
    if (strategy, "grid") not in cache:
        module = copy_layer_modules([original])[0]
        groups = ParallelDims(strategy.tp, 1).grid_groups(strategy, 0)  # any rank gives the same flags: rank 0
        grid_parallel(module, GridConfig(groups, 0, batched_names(program)), f"layer{layer_index}")
        cache[strategy, "grid"] = layer_meta(module)
    return cache[strategy, "grid"]


def producer_layouts(program: Program, plan: Plan) -> dict[str, Layout]:
    """Value name → the layout it is produced in (sequence-parallel and grid layers: per output); graph inputs:
    the trainer's data split; the embedding's and head's outputs: ``end_layout`` (the data split, or under vsp
    per output)."""
    devices = plan.devices_per_stage
    strategies = dict(zip((layer.index for layer in program.body), plan.layers))
    producers = {name: Layout(data_split(devices)) for name in program.placeholder_names}
    ends = end_layout(plan.embedding, devices)
    for layer in program.layers:
        strategy = strategies.get(layer.index, ends)
        seq = sequence_flags(program, plan, layer.index, strategy).seq_outputs if strategy.sp != "none" else ()
        features = grid_flags(program, plan, layer.index, strategy).feature_outputs if strategy.tp_mode != "1d" else ()
        for i, name in enumerate(layer.output_names):
            producers[name] = Layout(
                activation_strategy(strategy), bool(seq and seq[i]), bool(features and features[i])
            )
    return producers
