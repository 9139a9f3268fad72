"""Lowering passes for the parallelisms that cut inside layers, in the order ``lower`` runs them:

1. ``set_local_batches``: each layer's graph at its own local batch (``micro_batch / dp``);
2. ``apply_tensor_parallel``: layers with ``tp > 1`` and sp "none" sharded for this rank (``passes.tensor_parallel``);
3. ``apply_sequence_parallel``: Megatron-SP and Ulysses layers (``passes.sequence_parallel``);
4. ``apply_vocab_parallel``: prologue and epilogue vocab-parallel when ``vtp > 1`` (``passes.vocab_parallel``);
5. ``apply_layouts``: parameter gradients of layers that see more than the captured batch scaled, a
   ``redistribute`` node where a layer reads a value produced under another layout (batch and sequence
   blocks; also one received over a pipeline cut), and the stage's send/receive specs set to the blocks
   that actually travel;
6. ``apply_random_streams``: every random op on the stream its value calls for (``passes.random_streams``).

Each pass is ``pass_(stage, context) -> stage`` (see ``passes.lower_stage``) and does nothing for plans
whose layers all have ``tp == 1``.
"""

from __future__ import annotations

import warnings

from galvatron_fx.errors import PlanError
from galvatron_fx.plan import LayerStrategy
from galvatron_fx.program import BATCHED_KEY

from galvatron_fx.passes.lower.stage import LoweringContext, StageModule, layout_strategy, unwrap
from galvatron_fx.passes.analysis.batch_dim import set_batch
from galvatron_fx.passes.lower.graph.random_streams import assign_streams
from galvatron_fx.passes.lower.ops.redistribute import Layout, insert_redistribute, scale_param_grads, tp_group, tp_index, with_shape
from galvatron_fx.passes.lower.graph.sequence_parallel import META_KEY as SP_KEY, apply_sequence_parallel
from galvatron_fx.passes.lower.graph.vocab_parallel import apply_vocab_parallel
from galvatron_fx.passes.lower.graph.tensor_parallel import TPConfig, tensor_parallel


def _strategies(context: LoweringContext) -> dict[int, LayerStrategy]:
    """Program layer index → the strategy its activations are laid out by (prologue and epilogue: the data split)."""
    program, plan = context.program, context.plan
    embed = LayerStrategy(dp=plan.devices_per_stage)
    out = {layer.index: embed for layer in program.layers}
    out.update({layer.index: strategy for layer, strategy in zip(program.body, plan.layers)})
    return out


def _producers(context: LoweringContext) -> dict[str, Layout]:
    """Value name → layout it is produced in (sequence-parallel layers: per output); graph inputs: the data
    split of the trainer."""
    from galvatron_fx.passes.lower.graph.sequence_parallel import sequence_flags

    strategies = _strategies(context)
    producers = {name: Layout(LayerStrategy(dp=context.plan.devices_per_stage)) for name in context.program.placeholder_names}
    batched = None
    for layer in context.program.layers:
        strategy = strategies[layer.index]
        flags = (False,) * len(layer.output_names)
        if strategy.sp != "none":
            batched = batched if batched is not None else frozenset(_batched_names(context))
            flags = sequence_flags(context, layer.index, strategy, batched)["outputs"]
        for name, seq in zip(layer.output_names, flags):
            producers[name] = Layout(strategy, seq)
    return producers


def _batched_names(context: LoweringContext) -> set[str]:
    """Values of the Program whose dim 0 is the batch (captured as a symbol: ``passes.batch_dim``)."""
    names = {spec.name for layer in context.program.layers for spec in (*layer.inputs, *layer.boundary_out) if spec.batched}
    names |= {n.name for n in context.program.graph_module.graph.find_nodes(op="placeholder") if n.meta.get(BATCHED_KEY)}
    return names


def layer_batch(plan, layer) -> int:
    """Samples of a micro-batch that ``layer`` runs on each rank: ``micro_batch / dp`` of its layout."""
    return plan.micro_batch // layout_strategy(plan, layer).dp


def set_local_batches(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: a built stage. Ensures: every layer's graph metadata is at its own local batch (``layer_batch``):
    the graphs read the batch from their inputs, so nothing else changes. PlanError where the Program was
    captured with a fixed batch that differs."""
    program, plan = context.program, context.plan
    for layer in stage.stage_layers:
        batch = layer_batch(plan, layer)
        if program.dynamic_batch:
            set_batch(unwrap(stage.layers[layer.name]), batch)
        elif batch != program.batch_size:
            raise PlanError(f"{layer.name} ({layer.strategy.short()}) runs {batch} samples per micro-batch, but the model "
                            f"was captured at batch {program.batch_size} only ({program.static_batch_reason})",
                            f"capture it at an example batch of {batch}, or use a plan whose layers all run "
                            f"{program.batch_size} samples per rank and micro-batch")
    return stage


def make_tensor_parallel_pass(strict: bool = False):
    """The tensor-parallel pass; ``strict`` refuses (PlanError) layers that cannot be sharded as asked."""

    def apply_tensor_parallel(stage: StageModule, context: LoweringContext) -> StageModule:
        """Requires: layers at their local batch. Ensures: every layer with tp > 1 (and no Ulysses) is
        rewritten for this rank: sharded parameters, local sizes, collectives over its tp group."""
        rank = context.layout.rank
        for layer in stage.stage_layers:
            strategy = layer.strategy
            if strategy.tp == 1 or strategy.sp != "none" or layer.kind in ("prologue", "epilogue"):  # done by other passes
                continue
            ranks = tp_group(context.plan, strategy, rank)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tensor_parallel(unwrap(stage.layers[layer.name]), TPConfig(strategy.tp, ranks.index(rank), ranks, strict),
                                f"{layer.name} ({layer.layer_type})")
            for warning in caught:  # one warning per layer type is enough
                warnings.warn(str(warning.message), stacklevel=2)
        return stage

    return apply_tensor_parallel


apply_tensor_parallel = make_tensor_parallel_pass()


def apply_layouts(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: layers rewritten for their strategies. Ensures: gradient scaling for layers that see
    ``devices_per_stage / dp`` times the captured batch, redistribution on entry wherever a layer reads a
    value produced under another layout, send/receive specs in the producers' layouts."""
    plan = context.plan
    devices = plan.devices_per_stage
    producers = _producers(context)
    uniform = (all(p.dp == devices and p.seq == 1 for p in producers.values())
               and all(layout_strategy(plan, l).dp == devices for l in stage.stage_layers))
    if not uniform:
        _redistribute_inputs(stage, context, producers)

    def local(spec):
        if not (spec.batched and spec.name in producers):
            return spec
        source = producers[spec.name]
        rest = (spec.shape[1] // source.seq, *spec.shape[2:]) if len(spec.shape) > 1 else ()
        return with_shape(spec, (plan.micro_batch // source.dp, *rest))

    stage.recv_specs = tuple(local(spec) for spec in stage.recv_specs)
    stage.send_specs = tuple(local(spec) for spec in stage.send_specs)
    return stage


def _redistribute_inputs(stage: StageModule, context: LoweringContext, producers: dict[str, Layout]) -> None:
    plan, layout = context.plan, context.layout
    devices = plan.devices_per_stage
    batched = _batched_names(context)
    full_shapes = {spec.name: spec.shape for l in context.program.layers for spec in (*l.inputs, *l.boundary_out)}
    stage_ranks = tuple(layout.stage * devices + i for i in range(devices))
    for layer in stage.stage_layers:
        module = unwrap(stage.layers[layer.name])
        strategy = layout_strategy(plan, layer)
        scale_param_grads(module, strategy.dp / devices)
        seq_inputs = module.meta.get(SP_KEY, {}).get("inputs", frozenset())
        for name in layer.input_names:
            if name in batched and name in producers:
                seq_len = full_shapes[name][1] if len(full_shapes.get(name, ())) > 1 else 0
                insert_redistribute(module, name, producers[name], Layout(strategy, name in seq_inputs), devices, layout.local,
                                    stage_ranks, plan.micro_batch, seq_len)


def apply_random_streams(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: layers rewritten for their strategies (shards marked). Ensures: every random op runs on its
    random stream (``passes.random_streams``): the ranks holding a value draw alike, those holding different
    shards of it draw independently."""
    for layer in stage.stage_layers:
        shard_stream = 1 + tp_index(layer.strategy, context.layout.local) if layer.strategy.tp > 1 and layer.kind not in (
            "prologue", "epilogue") else 0
        assign_streams(unwrap(stage.layers[layer.name]), shard_stream)
    return stage


PARALLEL_PASSES = (set_local_batches, apply_tensor_parallel, apply_sequence_parallel, apply_vocab_parallel, apply_layouts,
                   apply_random_streams)
