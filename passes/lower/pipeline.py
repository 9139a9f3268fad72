"""Lowering: a Program and a Plan become one rank's pipeline stage. Every lowering pass, in order, is here.

``lower(program, plan, rank)`` builds the stage (``passes.lower.stage.build_stage``: copies of the stage's
layer graphs) and runs ``LOWERING_PASSES`` over it (``passes.infra``: each pass has one job and states what it
requires and ensures). A caller can read, extend or reorder the tuple and pass its own to ``lower``. Lowering
is collective-free, so a plan can be lowered for any rank of any world in one process; data parallelism needs
process groups and is applied by the runtime afterwards.

1. ``SetLocalBatches``: each layer's graph at its own local batch (``micro_batch / dp``);
2. ``ApplyTensorParallel``: layers with ``tp > 1`` and sp "none" sharded for this rank (``graph.tensor_parallel``,
   grids ``graph.grid_parallel``);
3. ``ApplySequenceParallel``: Megatron-SP and Ulysses layers (``graph.sequence_parallel``);
4. ``ApplyVocabParallel``: the embedding and head vocab-parallel when ``vtp > 1`` (``graph.vocab_parallel``), or
   under vsp sequence-parallel over their vtp group (``graph.sequence_parallel``, mode "vsp");
5. ``ApplyLayouts``: a ``redistribute`` node wherever a layer reads a value produced in another layout (also
   one received over a pipeline cut), gradients scaled where a layer sees more than the rank's own samples,
   and the stage's send/receive specs set to the blocks that actually travel (``layouts``);
6. ``ApplyRandomStreams``: every random op on the stream its value calls for (``graph.random_streams``);
7. ``CheckShapes``: every layer's inputs exist before it, with the shapes its graph expects;
8. ``DropMetadataAsserts``: export's dtype/device assertions removed (they fail under autocast or elsewhere);
9. ``RetargetDevice``: parameters, buffers and device constants on this rank's device;
10. ``ApplyCheckpointing``: layers with ``ckpt`` recompute their activations in backward.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx

from galvatron_fx.errors import PlanError
from galvatron_fx.parallel_dims import ParallelDims, embedding_strategy, layout_strategy, tp_index, uses_vsp
from galvatron_fx.passes.analysis.batch_dim import set_batch
from galvatron_fx.passes.infra import Pass, PassFailure, run_passes
from galvatron_fx.passes.lower.graph.grid_parallel import GridConfig, grid_parallel
from galvatron_fx.passes.lower.graph.random_streams import assign_streams, is_random
from galvatron_fx.passes.lower.graph.sequence_parallel import sequence_parallel
from galvatron_fx.passes.lower.graph.tensor_parallel import TPConfig, tensor_parallel
from galvatron_fx.passes.lower.graph.vocab_parallel import (
    VocabConfig,
    tied_vocab_names,
    vocab_parallel,
    vocab_parallel_tied,
    vocab_size,
)
from galvatron_fx.passes.lower.layouts import (
    Layout,
    batched_names,
    block_shape,
    insert_redistribute,
    producer_layouts,
    scale_param_grads,
    sp_config,
    vsp_config,
    with_shape,
)
from galvatron_fx.passes.lower.stage import (
    CheckpointedLayer,
    LoweringContext,
    StageLayer,
    StageModule,
    build_stage,
    unwrap,
)
from galvatron_fx.plan import Plan
from galvatron_fx.program import Program, layer_meta, layers_using, node_meta

PROLOGUE_AND_EPILOGUE = ("prologue", "epilogue")


def layer_batch(plan: Plan, layer: StageLayer) -> int:
    """Samples of a micro-batch that ``layer`` runs on each rank: ``micro_batch / dp`` of its layout."""
    return plan.micro_batch // _layout(plan, layer).dp


def _layout(plan: Plan, layer: StageLayer):
    """The strategy that decides where ``layer``'s activations live (``parallel_dims.layout_strategy``)."""
    return layout_strategy(layer.kind, layer.strategy, plan.devices_per_stage, plan.embedding)


def _graphs(stage: StageModule):
    """(stage layer, its GraphModule) for every layer of the stage."""
    return [(layer, unwrap(stage.layers[layer.name])) for layer in stage.stage_layers]


def _emit_once(caught) -> None:
    for message in dict.fromkeys(str(w.message) for w in caught):  # one warning per layer type is enough
        warnings.warn(message, stacklevel=3)


# -- 1 ------------------------------------------------------------------------------------------------------------
class SetLocalBatches(Pass[StageModule]):
    """Each layer's graph metadata at its own local batch: the graphs read the batch from their inputs, so
    nothing else changes. PlanError where the model was captured at a fixed batch that differs."""

    def requires(self, stage, context):
        if not stage.stage_layers:
            raise PassFailure("the stage has no layers")

    def __call__(self, stage, context):
        program, plan = context.program, context.plan
        for layer, graph in _graphs(stage):
            batch = layer_batch(plan, layer)
            if program.dynamic_batch:
                set_batch(graph, batch)
            elif batch != program.batch_size:
                raise PlanError(
                    f"{layer.name} ({layer.strategy.short()}) runs {batch} samples per micro-batch, but the model "
                    f"was captured at batch {program.batch_size} only ({program.static_batch_reason})",
                    f"capture it at an example batch of {batch}, or use a plan whose layers all run "
                    f"{program.batch_size} samples per rank and micro-batch",
                )
        return stage

    def ensures(self, stage, context):
        for layer, graph in _graphs(stage):
            sizes = {n.meta["val"].shape[0] for n in graph.graph.find_nodes(op="placeholder") if node_meta(n).batched}
            if sizes - {layer_batch(context.plan, layer)}:
                raise PassFailure(f"{layer.name}: batched inputs of sizes {sorted(sizes)}")


# -- 2 ------------------------------------------------------------------------------------------------------------
class ApplyTensorParallel(Pass[StageModule]):
    """Every body layer with ``tp > 1`` and no sequence parallelism rewritten for this rank: sharded
    parameters, local sizes, collectives over its tp group (``graph.tensor_parallel``; a grid ``tp_mode``:
    ``graph.grid_parallel``). ``strict``: a part that cannot be sharded is a PlanError instead of staying
    replicated with a warning."""

    def __init__(self, strict: bool = False):
        self.strict = strict

    @staticmethod
    def _applies(layer: StageLayer) -> bool:
        return layer.strategy.tp > 1 and layer.strategy.sp == "none" and layer.kind not in PROLOGUE_AND_EPILOGUE

    def __call__(self, stage, context):
        dims, rank = ParallelDims.of(context.plan), context.position.rank
        batched = batched_names(context.program)
        for layer, graph in _graphs(stage):
            if not self._applies(layer):
                continue
            what = f"{layer.name} ({layer.layer_type})"
            if layer.strategy.tp_mode != "1d":  # a grid: strict by construction (every part splits)
                grid_parallel(graph, GridConfig(dims.grid_groups(layer.strategy, rank), rank, batched), what)
                continue
            ranks = dims.tp_group(layer.strategy, rank)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tensor_parallel(graph, TPConfig(layer.strategy.tp, ranks.index(rank), ranks, self.strict), what)
            _emit_once(caught)
        return stage

    def ensures(self, stage, context):
        dims = ParallelDims.of(context.plan)
        for layer, graph in _graphs(stage):
            group = dims.tp_group(layer.strategy, context.position.rank)
            for record in layer_meta(graph).shards.values() if self._applies(layer) else ():
                if record.ranks != group:
                    raise PassFailure(f"{layer.name}: {record.name} is sharded over {record.ranks}, not {group}")


# -- 3 ------------------------------------------------------------------------------------------------------------
class ApplySequenceParallel(Pass[StageModule]):
    """Every layer with sp "megatron" or "ulysses" rewritten for this rank; its LayerMeta names the inputs that
    arrive and the outputs that leave sequence-sharded."""

    def __init__(self, strict: bool = False):
        self.strict = strict

    def __call__(self, stage, context):
        dims, batched = ParallelDims.of(context.plan), batched_names(context.program)
        shared = frozenset(name for name, users in layers_using(context.program).items() if len(users) > 1)
        for layer, graph in _graphs(stage):
            if layer.strategy.sp != "none":
                config = sp_config(dims, layer.strategy, context.position.rank, batched, self.strict)
                config = dataclasses.replace(config, shared_params=shared)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    sequence_parallel(graph, config, f"{layer.name} ({layer.layer_type})")
                _emit_once(caught)
        return stage

    def ensures(self, stage, context):
        for layer, graph in _graphs(stage):
            outputs = layer_meta(graph).seq_outputs
            if layer.strategy.sp != "none" and len(outputs) != len(layer.output_names):
                raise PassFailure(f"{layer.name}: {len(outputs)} sequence flags for {len(layer.output_names)} outputs")


# -- 4 ------------------------------------------------------------------------------------------------------------
class ApplyVocabParallel(Pass[StageModule]):
    """With ``vtp > 1``, the embedding and head (and a body layer that looks up their tied embedding, T5's
    decoder input) vocab-parallel over this rank's vtp group; under vsp instead the embedding and head
    sequence-parallel over that group with whole weights (a tied embedding stays whole for every layer).
    ``strict`` (vsp): a part that cannot be rewritten is a PlanError (it always is)."""

    def __init__(self, strict: bool = False):
        self.strict = strict

    def __call__(self, stage, context):
        program, plan = context.program, context.plan
        if plan.embedding.vtp == 1:
            return stage
        if uses_vsp(plan.embedding):
            config = vsp_config(plan, context.position.rank, batched_names(program), self.strict)
            for layer, graph in _graphs(stage):
                if layer.kind in PROLOGUE_AND_EPILOGUE:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        sequence_parallel(graph, config, f"{layer.name} ({layer.kind})")
                    _emit_once(caught)
            return stage
        vocab = vocab_size(program.epilogue.module)
        if vocab is None:
            raise PlanError(
                f"vtp={plan.embedding.vtp} needs a cross-entropy loss over a vocabulary, and "
                f"{program.model_name}'s loss is not one",
                "use vtp=1",
            )
        rank = context.position.rank
        ranks = ParallelDims.of(plan).tp_group(embedding_strategy(plan.embedding, plan.devices_per_stage), rank)
        config, shared, tied = (
            VocabConfig(plan.embedding.vtp, ranks.index(rank), ranks, vocab),
            {},
            tied_vocab_names(program),
        )
        for layer, graph in _graphs(stage):
            what = f"{layer.name} ({layer.kind})"
            if layer.kind in PROLOGUE_AND_EPILOGUE:
                vocab_parallel(graph, config, shared, what)
            elif tied & set(program.layers[layer.index].param_names):
                if layer.strategy.dp != plan.devices_per_stage:
                    raise PlanError(
                        f"{what} looks up the vocab-parallel embedding but runs {layer.strategy.short()}; only a "
                        "layer that holds each rank's own samples can share its shard",
                        f"give {layer.name} tp=1, or use vtp=1",
                    )
                vocab_parallel_tied(graph, config, shared, tied, what)
        return stage


# -- 5 ------------------------------------------------------------------------------------------------------------
class ApplyLayouts(Pass[StageModule]):
    """A ``redistribute`` node on entry wherever a layer reads a value produced in another layout, gradient
    scaling for layers that see ``devices_per_stage / dp`` times a rank's samples, and send/receive specs in
    the producers' layouts at this plan's micro-batch."""

    def __call__(self, stage, context):
        program, plan = context.program, context.plan
        devices = plan.devices_per_stage
        producers = producer_layouts(program, plan)
        layouts = [_layout(plan, layer) for layer in stage.stage_layers]
        if any(p.chunks != (devices, 1, 1) for p in producers.values()) or any(s.dp != devices for s in layouts):
            self._redistribute_inputs(stage, context, producers)

        def local(spec):
            if not (spec.batched and spec.name in producers):
                return spec
            return with_shape(spec, block_shape((plan.micro_batch, *spec.shape[1:]), producers[spec.name]))

        stage.recv_specs = tuple(local(spec) for spec in stage.recv_specs)
        stage.send_specs = tuple(local(spec) for spec in stage.send_specs)
        return stage

    @staticmethod
    def _redistribute_inputs(stage, context, producers: dict[str, Layout]) -> None:
        program, plan, position = context.program, context.plan, context.position
        devices = plan.devices_per_stage
        batched = batched_names(program)
        full_shapes = {
            spec.name: spec.shape for layer in program.layers for spec in (*layer.inputs, *layer.boundary_out)
        }
        for node in program.graph_module.graph.find_nodes(op="placeholder"):  # the batch (vsp splits its tokens)
            if isinstance(node.meta.get("val"), torch.Tensor):
                full_shapes.setdefault(node.name, tuple(node.meta["val"].shape))
        stage_ranks = ParallelDims.of(plan).stage_ranks(position.stage)
        for layer, graph in _graphs(stage):
            strategy = _layout(plan, layer)
            # the embedding and head keep their own scaling: vocab-parallel parts scale theirs, and under vsp
            # each rank's gradients cover its own tokens, summed over the stage by data parallelism
            scale_param_grads(graph, 1.0 if layer.kind in PROLOGUE_AND_EPILOGUE else strategy.dp / devices)
            meta = layer_meta(graph)
            for name in layer.input_names:
                if name in batched and name in producers:
                    insert_redistribute(
                        graph,
                        name,
                        producers[name],
                        Layout(strategy, name in meta.seq_inputs, name in meta.feature_inputs),
                        devices,
                        position.local,
                        stage_ranks,
                        (plan.micro_batch, *full_shapes[name][1:]),
                    )


# -- 6 ------------------------------------------------------------------------------------------------------------
class ApplyRandomStreams(Pass[StageModule]):
    """Every random op on its random stream (``graph.random_streams``): the ranks holding a value draw alike,
    those holding different shards of it draw independently."""

    def __call__(self, stage, context):
        for layer, graph in _graphs(stage):
            layout = _layout(context.plan, layer)  # the embedding and head: tp > 1 only under vsp
            sharded = layout.tp > 1
            assign_streams(graph, 1 + tp_index(layout, context.position.local) if sharded else 0)
        return stage

    def ensures(self, stage, context):
        for layer, graph in _graphs(stage):
            loose = [n.name for n in graph.graph.nodes if is_random(n)]
            if loose:
                raise PassFailure(f"{layer.name}: random ops {loose} draw outside their stream")


# -- 7 ------------------------------------------------------------------------------------------------------------
class CheckShapes(Pass[StageModule]):
    """Every layer's inputs are produced before it (by the batch, the previous stage or an earlier layer) with
    the shapes its rewritten graph expects, and the stage computes what it sends; PlanError otherwise."""

    def __call__(self, stage, context):
        where = f"stage {context.position.stage}"
        shapes = {spec.name: spec.shape for spec in stage.recv_specs}
        shapes.update({name: None for name in stage.batch_names})
        for layer, graph in _graphs(stage):
            for node in graph.graph.find_nodes(op="placeholder"):
                if node.name not in shapes:
                    raise PlanError(
                        f"{layer.name} reads {node.name}, which nothing before it on {where} provides",
                        "check pp_division against the layer table (galvatron-fx inspect)",
                    )
                value, expected = node.meta.get("val"), shapes[node.name]
                if expected is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(expected):
                    raise PlanError(
                        f"{layer.name} expects {node.name} of shape {tuple(value.shape)}, but gets {tuple(expected)}",
                        "capture the model again with the plan's micro-batch",
                    )
            for name, produced in zip(layer.output_names, graph.graph.output_node().args[0]):
                value = produced.meta.get("val") if isinstance(produced, fx.Node) else None
                shapes[name] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        for spec in stage.send_specs:
            if spec.name not in shapes:
                raise PlanError(f"{where} must send {spec.name} but does not compute it", "check pp_division")
        return stage


# -- 8 ------------------------------------------------------------------------------------------------------------
class DropMetadataAsserts(Pass[StageModule]):
    """No ``aten._assert_tensor_metadata`` checks remain: export records the dtype and device every cast saw
    while capturing; under autocast (bf16) or on another device these checks fail although the computation is
    right."""

    TARGET = torch.ops.aten._assert_tensor_metadata.default

    def __call__(self, stage, context):
        for _, graph in _graphs(stage):
            for module in graph.modules():
                if isinstance(module, fx.GraphModule):
                    for node in list(module.graph.find_nodes(op="call_function", target=self.TARGET)):
                        if not node.users:
                            module.graph.erase_node(node)
                    module.recompile()
        return stage

    def ensures(self, stage, context):
        for layer, graph in _graphs(stage):
            if graph.graph.find_nodes(op="call_function", target=self.TARGET):
                raise PassFailure(f"{layer.name} still asserts tensor metadata")


# -- 9 ------------------------------------------------------------------------------------------------------------
class RetargetDevice(Pass[StageModule]):
    """Parameters, buffers and every device constant in the graphs (export records ``device='cpu'`` in casts
    and factory calls) on ``context.device``; a meta stage keeps its tensors on meta (it is materialised shard
    by shard later)."""

    def __call__(self, stage, context):
        device = context.device

        def move(arg: Any) -> Any:
            return device if isinstance(arg, torch.device) else arg

        for _, graph in _graphs(stage):
            for module in graph.modules():
                if isinstance(module, fx.GraphModule):
                    for node in module.graph.nodes:
                        node.args = fx.node.map_aggregate(node.args, move)
                        node.kwargs = fx.node.map_aggregate(node.kwargs, move)
                    module.recompile()
        if not any(p.is_meta for p in stage.parameters()):
            stage.to(device)
        return stage

    def ensures(self, stage, context):
        wrong = {
            t.device
            for t in (*stage.parameters(), *stage.buffers())
            if t.device.type not in (context.device.type, "meta")
        }
        if wrong:
            raise PassFailure(f"tensors left on {sorted(map(str, wrong))}, not {context.device}")


# -- 10 -----------------------------------------------------------------------------------------------------------
class ApplyCheckpointing(Pass[StageModule]):
    """Every layer whose strategy has ``ckpt`` wrapped in a CheckpointedLayer (recomputed in backward)."""

    def __call__(self, stage, context):
        for layer in stage.stage_layers:
            if layer.strategy.ckpt and not isinstance(stage.layers[layer.name], CheckpointedLayer):
                stage.layers[layer.name] = CheckpointedLayer(stage.layers[layer.name])
        return stage

    def ensures(self, stage, context):
        for layer in stage.stage_layers:
            if layer.strategy.ckpt != isinstance(stage.layers[layer.name], CheckpointedLayer):
                raise PassFailure(
                    f"{layer.name}: ckpt={layer.strategy.ckpt} but the layer is "
                    f"{type(stage.layers[layer.name]).__name__}"
                )


LOWERING_PASSES: tuple[Pass[StageModule], ...] = (
    SetLocalBatches(),
    ApplyTensorParallel(),
    ApplySequenceParallel(),
    ApplyVocabParallel(),
    ApplyLayouts(),
    ApplyRandomStreams(),
    CheckShapes(),
    DropMetadataAsserts(),
    RetargetDevice(),
    ApplyCheckpointing(),
)


def lower(
    program: Program,
    plan: Plan,
    rank: int,
    device: torch.device | str = "cpu",
    passes: Sequence[Pass[StageModule]] = LOWERING_PASSES,
) -> StageModule:
    """This rank's stage: ``build_stage`` followed by ``passes`` in order (see the module docstring)."""
    context = LoweringContext(program, plan, ParallelDims.of(plan).position(rank), torch.device(device))
    return run_passes(passes, build_stage(context), context)
