"""What lowering cannot do, found before the search prices it: so that every plan the search returns lowers.

Tensor and sequence parallelism depend on a layer's graph: heads and hidden sizes that a degree must divide,
ops that mix along a sharded dimension, a sequence the group must split. ``lowering_obstacles`` lowers one
layer of every type, for every degree, sequence-parallel mode and grid ``tp_mode``, on a copy, for one rank
(collective-free), in strict mode, and records why each one that fails cannot run. The cost model then leaves
those strategies out, with the reason shown (``LayerTypeProfile.lowering_obstacles``); the same check decides
whether the embedding and head can be vocab-parallel (``vtp{n}``) and sequence-parallel under vsp (``vsp{n}``: a loss
that is not a cross-entropy over the sequence's positions, a head that picks positions, as classifiers do, or a
sequence the group cannot split). Results are cached per Program.
"""

from __future__ import annotations

import warnings

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import copy_layer_modules
from galvatron_fx.parallel_dims import ParallelDims
from galvatron_fx.passes.lower.graph.grid_parallel import GridConfig, grid_parallel
from galvatron_fx.passes.lower.graph.sequence_parallel import SPConfig, sequence_parallel
from galvatron_fx.passes.lower.graph.tensor_parallel import TPConfig, tensor_parallel
from galvatron_fx.passes.lower.graph.vocab_parallel import VocabConfig, tied_vocab_names, vocab_parallel, vocab_size
from galvatron_fx.passes.lower.layouts import batched_names
from galvatron_fx.plan import SP_TYPES, LayerStrategy, tp_modes_for
from galvatron_fx.program import Program, node_meta


def _degrees(max_tp: int) -> list[int]:
    out, tp = [], 2
    while tp <= max_tp:
        out.append(tp)
        tp *= 2
    return out


def layer_obstacle(program: Program, layer_index: int, strategy: LayerStrategy) -> str | None:
    """Why body layer ``layer_index`` (into ``program.layers``) cannot be lowered under ``strategy``'s tensor and
    sequence parallelism, or None."""
    if strategy.tp == 1:
        return None
    if not program.dynamic_batch:
        return f"the model was captured at a fixed batch ({program.static_batch_reason})"
    module = copy_layer_modules([program.layers[layer_index].module])[0]
    ranks = tuple(range(strategy.tp))
    batched = frozenset(n.name for n in module.graph.find_nodes(op="placeholder") if node_meta(n).batched)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if strategy.tp_mode != "1d":
                groups = ParallelDims(strategy.tp, 1).grid_groups(strategy, 0)
                grid_parallel(module, GridConfig(groups, 0, batched), f"layer{layer_index}")
            elif strategy.sp == "none":
                tensor_parallel(module, TPConfig(strategy.tp, 0, ranks, strict=True), f"layer{layer_index}")
            else:
                sequence_parallel(
                    module, SPConfig(strategy.sp, strategy.tp, 0, ranks, batched, strict=True), f"layer{layer_index}"
                )
    except PlanError as error:
        return error.cause
    return None


def vocab_obstacle(program: Program, vtp: int) -> str | None:
    """Why the embedding and head cannot be vocab-parallel over ``vtp`` ranks, or None."""
    if vtp == 1:
        return None
    vocab = vocab_size(program.epilogue.module)
    if vocab is None:
        return "the model's loss is not a cross-entropy over a vocabulary"
    tied = tied_vocab_names(program)
    if tied:  # lowers where that layer keeps tp=1; the search does not price the combination, so leaves it out
        return f"body layers look up the embedding {sorted(tied)[0]} too (they must then run with tp=1)"
    prologue, epilogue = copy_layer_modules([program.prologue.module, program.epilogue.module])
    config, shared = VocabConfig(vtp, 0, tuple(range(vtp)), vocab), {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vocab_parallel(prologue, config, shared, "prologue")
            vocab_parallel(epilogue, config, shared, "epilogue")
    except PlanError as error:
        return error.cause
    return None


def vsp_obstacle(program: Program, vtp: int) -> str | None:
    """Why the embedding and head cannot run sequence-parallel over ``vtp`` ranks (vsp), or None."""
    if vtp == 1:
        return None
    if not program.dynamic_batch:  # the group's ranks run its samples together: another batch than captured
        return f"the model was captured at a fixed batch ({program.static_batch_reason})"
    config = SPConfig("vsp", vtp, 0, tuple(range(vtp)), batched_names(program), strict=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = copy_layer_modules([program.prologue.module, program.epilogue.module])
            for name, part in zip(("the embedding", "the head"), parts):
                sequence_parallel(part, config, name)
    except PlanError as error:
        return error.cause
    return None


def lowering_obstacles(program: Program, max_tp: int) -> dict[str, dict[str, str]]:
    """Layer type → ``LayerStrategy.lowering_key`` → why it cannot be lowered, for tp degrees up to ``max_tp``;
    the key ``"embedding"`` maps ``vtp{n}`` and ``vsp{n}`` the same way."""
    first = {}
    for layer in program.body:
        first.setdefault(layer.layer_type, layer.index)
    out: dict[str, dict[str, str]] = {}
    for layer_type, index in first.items():
        for tp in _degrees(max_tp):
            strategies = [LayerStrategy(tp=tp, sp=sp) for sp in SP_TYPES] + [
                LayerStrategy(tp=tp, tp_mode=mode, tp_depth=depth) for mode, depth in tp_modes_for(tp)[1:]
            ]
            for strategy in strategies:
                reason = layer_obstacle(program, index, strategy)
                if reason:
                    out.setdefault(layer_type, {})[strategy.lowering_key] = reason
    for vtp in _degrees(max_tp):
        reason = vocab_obstacle(program, vtp)
        if reason:
            out.setdefault("embedding", {})[f"vtp{vtp}"] = reason
        reason = vsp_obstacle(program, vtp)
        if reason:
            out.setdefault("embedding", {})[f"vsp{vtp}"] = reason
    return out
