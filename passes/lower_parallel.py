"""Lowering passes for the parallelisms that cut inside layers, in the order ``lower`` runs them:

1. ``rescale_batches``: each layer's graph runs at its own local batch (``micro_batch / dp``);
2. ``apply_tensor_parallel``: layers with ``tp > 1`` and sp "none" sharded for this rank (``passes.tensor_parallel``);
3. ``apply_sequence_parallel``: Megatron-SP and Ulysses layers (``passes.sequence_parallel``);
4. ``apply_vocab_parallel``: prologue and epilogue vocab-parallel when ``vtp > 1`` (``passes.vocab_parallel``);
5. ``apply_layouts``: parameter gradients of layers that see more than the captured batch scaled, a
   ``redistribute`` node where a layer reads a value produced under another layout (batch and sequence
   blocks; also one received over a pipeline cut), and the stage's send/receive specs set to the blocks
   that actually travel.

Each pass is ``pass_(stage, context) -> stage`` (see ``passes.lower_stage``) and does nothing for plans
whose layers all have ``tp == 1``.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import torch

from galvatron_fx.errors import PlanError
from galvatron_fx.plan import LayerStrategy

from .lower_stage import LoweringContext, StageModule, unwrap
from .redistribute import Layout, insert_redistribute, rescale_batch, scale_param_grads, tp_group, with_shape
from .sequence_parallel import META_KEY as SP_KEY, apply_sequence_parallel
from .vocab_parallel import apply_vocab_parallel
from .tensor_parallel import TPConfig, tensor_parallel


def layout_strategy(plan, layer) -> LayerStrategy:
    """The strategy that decides where a layer's activations live: prologue and epilogue keep the trainer's
    data split whatever their vtp (``passes.vocab_parallel``), other layers follow their own strategy."""
    return LayerStrategy(dp=plan.devices_per_stage) if layer.kind in ("prologue", "epilogue") else layer.strategy


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
    from .sequence_parallel import sequence_flags

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
    names = {spec.name for layer in context.program.layers for spec in (*layer.inputs, *layer.boundary_out) if spec.batched}
    values = {n.name: n.meta.get("val") for n in context.program.graph_module.graph.find_nodes(op="placeholder")}
    names |= {n for n, v in values.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == context.program.batch_size}
    return names


def _check_capture(context: LoweringContext) -> None:
    plan, program = context.plan, context.program
    if program.batch_size * plan.devices_per_stage != plan.micro_batch:
        raise PlanError(f"the Program was captured with batch {program.batch_size}, but the plan splits micro-batches of "
                        f"{plan.micro_batch} over {plan.devices_per_stage} devices per stage",
                        f"capture the model with an example batch of {plan.micro_batch // plan.devices_per_stage} samples")


def rescale_batches(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: a Program captured at ``micro_batch / devices_per_stage``. Ensures: every layer's graph runs
    at its own local batch ``micro_batch / dp`` (views rewritten, metadata recomputed)."""
    plan = context.plan
    if all(layout_strategy(plan, layer).dp == plan.devices_per_stage for layer in stage.stage_layers):
        return stage
    _check_capture(context)
    if context.program.batch_size == 1:  # a batch dim of size 1 cannot be told apart in the views
        raise PlanError("the Program was captured with batch 1, but layers with tp > 1 run larger batches",
                        "use a global batch with at least 2 samples per device and micro-batch")
    batched = _batched_names(context)
    for layer in stage.stage_layers:
        ratio = Fraction(plan.devices_per_stage, layout_strategy(plan, layer).dp)
        rescale_batch(unwrap(stage.layers[layer.name]), batched, ratio, layer.name, layer.output_names)
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
    plan, layout = context.plan, context.layout
    devices = plan.devices_per_stage
    producers = _producers(context)
    if all(p.dp == devices and p.seq == 1 for p in producers.values()) and all(layout_strategy(plan, l).dp == devices for l in stage.stage_layers):
        return stage
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

    def local(spec):
        if not (spec.batched and spec.name in producers):
            return spec
        source = producers[spec.name]
        rest = (spec.shape[1] // source.seq, *spec.shape[2:]) if len(spec.shape) > 1 else ()
        return with_shape(spec, (plan.micro_batch // source.dp, *rest))

    stage.recv_specs = tuple(local(spec) for spec in stage.recv_specs)
    stage.send_specs = tuple(local(spec) for spec in stage.send_specs)
    return stage


PARALLEL_PASSES = (rescale_batches, apply_tensor_parallel, apply_sequence_parallel, apply_vocab_parallel, apply_layouts)
