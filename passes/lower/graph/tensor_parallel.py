"""Tensor parallelism found in a layer's graph: Megatron column/row-parallel pairs, with no per-model code.

How the pairs are found. Every projection whose weight is a parameter (``aten.linear``, ``addmm``, ``mm``,
``matmul``) and whose input is replicated is a candidate *column-parallel* projection ("root"); its output
feature dimension is one unit, a ``Factor``. Values derived from roots are followed through the graph
(``passes.analysis.dim_tracking``): views split factors (192 → 3 sections × 4 heads × 16), elementwise ops and
attention align factors of different tensors (q heads ≡ k heads, GQA: q heads = kv heads × repeats), and
ops that mix along a factor (attention over head_dim, softmax, norms, sections picked by ``split``) forbid
sharding it. A projection whose input is derived is *row-parallel* ("sink"): its contraction factors are
where the work is cut. For each group of roots and sinks the pass picks the outermost allowed factors whose
sizes divide tp (heads, or kv heads then repeats when tp exceeds the kv heads), shards the weights
accordingly, rewrites view/expand/split sizes to the local ones, and inserts visible collectives:
``tp_copy`` (identity forward, all-reduce backward) where replicated values enter the sharded region,
``tp_scatter`` where a replicated value carrying a sharded factor (T5/Swin position bias) meets it,
``tp_reduce`` (all-reduce forward) after row-parallel projections, whose biases are added after the sum.
A group that cannot be sharded (no divisible factor, an unknown op on sharded values, no row-parallel
end) stays replicated with a warning naming the obstacle, or raises PlanError when ``strict``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import get_attr_path, set_attr_path
from galvatron_fx.passes.analysis.dim_factors import Factor, local_shape, rewrite_sizes, shard_spec
from galvatron_fx.passes.analysis.dim_tracking import Analysis, analyze, rewritten_meta
from galvatron_fx.passes.lower.graph.random_streams import mark_sharded
from galvatron_fx.passes.lower.ops.collectives import tp_copy, tp_reduce, tp_scatter
from galvatron_fx.program import set_layer_meta

aten = torch.ops.aten


@dataclass(frozen=True)
class TPConfig:
    """``tp`` ranks (global ids ``ranks``, in tp-rank order) share the layer; this process is ``tp_rank``."""

    tp: int
    tp_rank: int
    ranks: tuple[int, ...]
    strict: bool = False  # raise PlanError instead of replicating what cannot be sharded


@dataclass(frozen=True)
class ShardRecord:
    """How a parameter was sharded: enough to reshard a checkpoint. ``dim`` of the full tensor is viewed as
    ``factor_sizes`` (row-major); ``picks[i]`` is this rank's ``(start, length)`` on factor i, or None.
    ``extra``: further ``(dim, factor_sizes, picks)`` cuts of that shard (a grid's column split)."""

    name: str
    full_shape: tuple[int, ...]
    dim: int
    factor_sizes: tuple[int, ...]
    picks: tuple[tuple[int, int] | None, ...]
    replicas: int  # tp ranks holding this same shard (their gradients are summed)
    ranks: tuple[int, ...] = ()  # the tp group (global ranks) that holds the shards
    extra: tuple = ()

    @property
    def entries(self) -> tuple:
        """Every cut, in order, as ``select_local`` takes them."""
        return ((self.dim, self.factor_sizes, self.picks), *self.extra)

    def positions(self) -> torch.Tensor:
        """Flat indices into the full tensor of this shard's elements, in the shard's order."""
        return self.select(torch.arange(math.prod(self.full_shape)).view(self.full_shape)).reshape(-1)

    def select(self, full: torch.Tensor) -> torch.Tensor:
        from galvatron_fx.passes.lower.ops.collectives import select_local

        return select_local(full, self.entries)


@dataclass
class TPResult:
    module: fx.GraphModule
    ranks: tuple[int, ...] = ()
    sharded: list[str] = field(default_factory=list)  # names of sharded parameters
    warnings: list[str] = field(default_factory=list)


# -- choosing what to cut --------------------------------------------------------------------------------
def _choose(analysis: Analysis, component: frozenset[fx.Node], tp: int) -> dict[Factor, int] | str:
    """Factor class → ways it is split (product tp), or the reason no choice exists."""
    sinks = [s for s, info in analysis.sinks.items() if info.roots <= component]
    if not sinks:
        return "its column-parallel output reaches no row-parallel projection"
    order = analysis.factors.leaves_of(analysis.sinks[sinks[0]].contraction)
    picks: dict[Factor, int] = {}
    remaining = tp
    for leaf in order:
        cls = analysis.factors.find(leaf)
        if cls in picks or cls.reason:
            continue
        ways = math.gcd(remaining, leaf.size)
        if ways > 1:
            picks[cls] = ways
            remaining //= ways
        if remaining == 1:
            break
    if remaining > 1:
        units = " × ".join(
            f"{leaf.size}" + (f" ({analysis.factors.find(leaf).reason})" if analysis.factors.find(leaf).reason else "")
            for leaf in order
        )
        return f"tp={tp} does not divide its shardable units (contraction {units})"
    for sink in sinks:
        covered = math.prod(
            picks.get(analysis.factors.find(leaf), 1)
            for leaf in analysis.factors.leaves_of(analysis.sinks[sink].contraction)
        )
        if covered != tp:
            return f"row-parallel {sink.name} would see only {covered} of {tp} parts"
    return picks


def _rank_indices(picks: dict[Factor, int], tp_rank: int) -> dict[Factor, int]:
    """Mixed-radix decomposition of the tp rank over the picked factor classes (first pick outermost)."""
    indices, stride = {}, math.prod(picks.values())
    for cls, ways in picks.items():
        stride //= ways
        indices[cls] = (tp_rank // stride) % ways
    return indices


# -- rewriting -------------------------------------------------------------------------------------------
def _set_param(gm: fx.GraphModule, target: str, value: torch.Tensor, requires_grad: bool) -> None:
    set_attr_path(gm, target, nn.Parameter(value.detach().clone().contiguous(), requires_grad=requires_grad))


def _shard_param(gm, node: fx.Node, dim: int, leaves, analysis, picks, indices, tp, result, records) -> ShardRecord:
    spec = shard_spec(analysis.factors, leaves, picks, indices)
    covered = math.prod(picks.get(analysis.factors.find(leaf), 1) for leaf in leaves)
    full = get_attr_path(gm, node.target)
    record = ShardRecord(node.target, tuple(full.shape), dim, spec[0], spec[1], tp // covered, result.ranks)
    if node.target not in records:
        _set_param(gm, node.target, record.select(full), full.requires_grad)
        records[node.target] = record
        result.sharded.append(node.target)
    return record


def _slot(picks, indices, leaves, factors) -> tuple[int, int]:
    """Which shard of a partly replicated parameter this rank holds, and how many distinct shards exist:
    ranks with the same slot hold the same shard (they agree on every picked class in ``leaves``)."""
    classes = {factors.find(leaf) for leaf in leaves}
    slot, slots = 0, 1
    for cls, ways in picks.items():
        if cls in classes:
            slot, slots = slot * ways + indices[cls], slots * ways
    return slot, slots


def _rewrite(
    gm: fx.GraphModule, analysis: Analysis, chosen: dict[frozenset, dict], cfg: TPConfig, result: TPResult
) -> None:
    factors, graph, ranks = analysis.factors, gm.graph, cfg.ranks
    picks = {cls: ways for choice in chosen.values() for cls, ways in choice.items()}
    indices = {}
    for choice in chosen.values():
        indices.update(_rank_indices(choice, cfg.tp_rank))
    live = {root for component in chosen for root in component}
    tainted = {n for n, roots in analysis.taint.items() if roots & live}
    mark_sharded(tainted)
    records: dict[str, ShardRecord] = {}

    # parameters: column-parallel weights/biases along their output units, row-parallel along contraction
    choice_of = {root: choice for component, choice in chosen.items() for root in component}
    for root, info in analysis.roots.items():
        if root not in live:
            continue
        leaves = factors.leaves_of([info.out_factor])
        record = _shard_param(
            gm, info.weight, info.weight_out_dim, leaves, analysis, picks, indices, cfg.tp, result, records
        )
        params = [info.weight]
        if info.bias is not None:
            _shard_param(gm, info.bias, 0, leaves, analysis, picks, indices, cfg.tp, result, records)
            params.append(info.bias)
        if record.replicas > 1:  # e.g. kv heads shared by several tp ranks: their gradients are partial
            slot, slots = _slot(choice_of[root], indices, leaves, factors)
            for param in params:
                with graph.inserting_before(root):
                    copy = graph.call_function(tp_copy, (param, ranks, slot, slots))
                root.replace_input_with(param, copy)
    sharded_nodes = {info.weight for root, info in analysis.roots.items() if root in live}
    sharded_nodes |= {info.bias for root, info in analysis.roots.items() if root in live and info.bias is not None}
    for info in analysis.sinks.values():
        if info.roots & live:
            leaves = factors.leaves_of(info.contraction)
            _shard_param(gm, info.weight, info.weight_in_dim, leaves, analysis, picks, indices, cfg.tp, result, records)
            sharded_nodes.add(info.weight)

    # local sizes in views, expands and splits of sharded values
    for node in list(graph.nodes):
        if node not in tainted or node.op != "call_function":
            continue
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
            local = local_shape(factors, analysis.dims[node], picks)
            node.args = (node.args[0], rewrite_sizes(node.args[1], local, list(node.meta["val"].shape)), *node.args[2:])
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            pieces = [local_shape(factors, d, picks)[dim] for d in analysis.dims[node]]
            size = pieces[0] if node.target is aten.split.Tensor else pieces
            node.args = (node.args[0], size, *node.args[2:])

    # replicated values entering sharded work: copy (gradient all-reduce), or scatter when they carry a cut factor
    entered: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node not in tainted or node in analysis.sinks or node.op != "call_function":
            continue
        for arg in list(node.all_input_nodes):
            if arg in tainted or arg in sharded_nodes or arg.target in (tp_copy,) or not _is_float_tensor(arg):
                continue
            spec = tuple(
                entry
                for entry in (
                    (dim, *shard_spec(factors, factors.leaves_of(d), picks, indices))
                    for dim, d in enumerate(analysis.dims.get(arg, []))
                )
                if any(p is not None for p in entry[2])
            )
            key = (arg, spec)
            if key not in entered:
                with graph.inserting_after(arg):
                    entered[key] = (
                        graph.call_function(tp_scatter, (arg, spec, ranks))
                        if spec
                        else graph.call_function(tp_copy, (arg, ranks))
                    )
            node.replace_input_with(arg, entered[key])

    # row-parallel ends: sum the partial products, then add the bias once
    for sink, info in analysis.sinks.items():
        if not info.roots & live:
            continue
        bias = info.bias
        if bias is not None:
            if sink.target is aten.addmm.default:
                sink.target, sink.args = aten.mm.default, (sink.args[1], sink.args[2])
            else:
                sink.args = sink.args[:2]
                sink.kwargs = {}
        with graph.inserting_after(sink):
            reduced = graph.call_function(tp_reduce, (sink, ranks))
        out = reduced
        if bias is not None:
            with graph.inserting_after(reduced):
                out = graph.call_function(aten.add.Tensor, (reduced, bias))
        sink.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reduced)
    graph.lint()
    gm.recompile()
    set_layer_meta(gm, shards=records)


def tp_region(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of a tensor-parallel graph that work on sharded or whole-group values: from where values enter
    (``tp_copy``, ``tp_scatter``) up to the ``tp_reduce`` after the row-parallel projections."""
    region, stack = set(), [n for n in gm.graph.nodes if n.target in (tp_copy, tp_scatter)]
    while stack:
        node = stack.pop()
        if node in region or node.target is tp_reduce:
            continue
        region.add(node)
        stack.extend(node.users)
    return region


def _is_float_tensor(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


# -- the pass ------------------------------------------------------------------------------------------
def tensor_parallel(gm: fx.GraphModule, cfg: TPConfig, layer_name: str = "layer") -> TPResult:
    """Requires: an ATen-level layer GraphModule with ``meta["val"]`` on its nodes, whose parameters are
    the full ones. Ensures: ``gm`` rewritten in place for tp rank ``cfg.tp_rank``: parameters sharded (each
    with a ShardRecord in ``layer_meta(gm).shards``), local view sizes, collectives as nodes; parts that
    cannot be sharded stay replicated and are named in ``result.warnings`` (PlanError when strict)."""
    result = TPResult(gm, cfg.ranks)
    if cfg.tp == 1:
        return result
    excluded: set[fx.Node] = set()
    while True:
        analysis = analyze(gm, excluded)
        blocked: dict[frozenset, str] = {}
        chosen: dict[frozenset, dict] = {}
        for component in analysis.components():
            reason = analysis.obstacles.get(component) or _choose(analysis, component, cfg.tp)
            if isinstance(reason, str):
                blocked[component] = reason
            else:
                chosen[component] = reason
        if not blocked:
            break
        for component, reason in blocked.items():
            weights = ", ".join(sorted(analysis.roots[r].weight.target for r in component))
            result.warnings.append(f"{layer_name}: projections {weights} stay replicated: {reason}")
            # its row-parallel ends must not start new regions either
            excluded |= component | {s for s, info in analysis.sinks.items() if info.roots & component}
    if result.warnings and cfg.strict:
        raise PlanError(
            "; ".join(result.warnings),
            "choose a tp degree that divides the attention heads and hidden sizes, "
            "or let those parts replicate (strict=False)",
        )
    for message in result.warnings:
        warnings.warn(message, stacklevel=2)
    if not chosen:
        return result
    _rewrite(gm, analysis, chosen, cfg, result)
    rewritten_meta(gm, f"{layer_name}: tensor parallelism over {cfg.tp} ranks", "use another tp degree for this layer")
    return result
