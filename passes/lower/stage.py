"""Lowering: Program + Plan + rank → that rank's pipeline stage, as an nn.Module built from the layer graphs.

World layout (the one every part of galvatron_fx uses): ``rank = stage * devices_per_stage + local``,
i.e. pipeline stages are contiguous blocks of ranks and ``local`` is the index inside the stage (the
data-parallel index while tp is 1). Stage ``s`` runs body layers ``plan.stage_layers(s)``; the first stage
also runs the prologue, the last one the epilogue (and so the loss).

``lower(program, plan, rank)`` builds the stage (``build_stage``) and then applies the lowering passes in
order; each pass is ``pass_(stage, context) -> stage`` with one job (see ``DEFAULT_PASSES``). Parallelisms
that cut inside a layer add their passes to that list. Data parallelism needs process groups and is
applied by the runtime afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.errors import PlanError
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import Program, TensorSpec

from galvatron_fx.passes.lower.graph.random_streams import layer_seed, seed_generators
from galvatron_fx.passes.lower.ops.redistribute import dp_index, shared_conversions


@dataclass(frozen=True)
class RankLayout:
    """Where a rank sits: ``rank = stage * devices_per_stage + local``."""

    rank: int
    stage: int
    local: int
    num_stages: int
    devices_per_stage: int

    @classmethod
    def of(cls, plan: Plan, rank: int) -> "RankLayout":
        stage, local = divmod(rank, plan.devices_per_stage)
        return cls(rank, stage, local, plan.pp, plan.devices_per_stage)

    def rank_of(self, stage: int, local: int | None = None) -> int:
        return stage * self.devices_per_stage + (self.local if local is None else local)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclass(frozen=True)
class LoweringContext:
    """What every lowering pass may read."""

    program: Program
    plan: Plan
    layout: RankLayout
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class StageLayer:
    """One layer of a stage: which Program layer, how it is called, and the strategy it runs with."""

    index: int  # into program.layers
    name: str  # key in StageModule.layers
    kind: str
    layer_type: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    strategy: LayerStrategy
    data_index: int = 0  # which block of the micro-batch's samples this rank holds here (its random seed's key)


def embedding_strategy(plan: Plan) -> LayerStrategy:
    """The strategy of prologue and epilogue: ``vtp`` ranks share the vocabulary, ``devices / vtp``
    replicas of each shard synchronise with ``plan.embedding.data_parallel_type``. Their activations keep
    the trainer's data layout (each rank its own samples; see ``passes.vocab_parallel``)."""
    vtp = plan.embedding.vtp
    return LayerStrategy(tp=vtp, dp=plan.devices_per_stage // vtp, dp_type=plan.embedding.data_parallel_type)


def layout_strategy(plan: Plan, layer: "StageLayer") -> LayerStrategy:
    """The strategy that decides where a layer's activations live: prologue and epilogue keep the trainer's
    data split whatever their vtp (``passes.vocab_parallel``), other layers follow their own strategy."""
    return LayerStrategy(dp=plan.devices_per_stage) if layer.kind in ("prologue", "epilogue") else layer.strategy


def local_micro_batch(plan: Plan, stage: int = 0) -> int:
    """Samples each rank of ``stage`` receives per micro-batch: ``global_batch / chunks / devices_per_stage``
    (layers with tensor parallelism run a larger batch; see ``passes.lower_parallel``)."""
    return plan.micro_batch // plan.devices_per_stage


def loss_name(program: Program) -> str:
    """The graph value that is the loss: the output keyed ``loss``, else the only scalar float output."""
    names = program.output_names
    context = getattr(program.out_spec, "context", None)
    if isinstance(context, (list, tuple)) and "loss" in context and len(context) == len(names):
        return names[list(context).index("loss")]
    values = {n.name: n.meta.get("val") for n in program.graph_module.graph.nodes}
    scalars = [name for name in names if isinstance(values.get(name), torch.Tensor)
               and values[name].dim() == 0 and values[name].is_floating_point()]
    if len(scalars) != 1:
        raise PlanError(f"cannot tell which output of {program.model_name} is the loss (scalar outputs: {scalars})",
                        "return the loss from forward (as 'loss' of a dict/ModelOutput, or as the only scalar)")
    return scalars[0]


class CheckpointedLayer(nn.Module):
    """A layer whose activations are recomputed in backward (``torch.utils.checkpoint``, non-reentrant)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False)


def unwrap(module: nn.Module) -> fx.GraphModule:
    """The layer's GraphModule under any wrappers (checkpointing)."""
    while isinstance(module, CheckpointedLayer):
        module = module.layer
    return module


class StageModule(nn.Module):
    """The layers of one pipeline stage. ``forward(env)`` reads its inputs by name from ``env`` (batch
    values and received activations), runs every layer, and returns the stage's outputs: the values to send
    to the next stage in ``send_specs`` order, or ``[loss]`` on the last stage. Returning only these (not
    every intermediate value) keeps the data-parallel root's backward hooks on what backward starts from."""

    def __init__(self, layout: RankLayout, layers: Sequence[StageLayer], modules: dict[str, nn.Module],
                 recv_specs: tuple[TensorSpec, ...], send_specs: tuple[TensorSpec, ...],
                 batch_names: tuple[str, ...], loss_name: str | None, micro_batch: int,
                 grad_names: frozenset[str] = frozenset(), device: torch.device = torch.device("cpu")):
        super().__init__()
        self.layout = layout
        self.device = device  # where the layers run: whose random generator dropout draws from
        self.stage_layers = tuple(layers)
        self.layers = nn.ModuleDict(modules)
        self.recv_specs = recv_specs  # activations received from the previous stage, in order
        self.send_specs = send_specs  # activations sent to the next stage, in order
        self.batch_names = batch_names  # graph inputs (from the batch) this stage reads
        self.loss_name = loss_name  # set on the last stage only
        self.micro_batch = micro_batch  # samples per micro-batch on this rank
        # received and sent values whose gradient travels back across the cut
        self.grad_names = frozenset(spec.name for spec in recv_specs + send_specs if spec.name in grad_names)

    def forward(self, env: dict[str, Any], seed: int | None = None) -> list[torch.Tensor]:
        with shared_conversions():   # a value several layers read in one layout moves once
            for layer in self.stage_layers:
                if seed is not None:  # random draws depend on (seed, layer, samples held), not on the stage
                    seed_generators(layer_seed(seed, layer.index, layer.data_index), self.device)
                outputs = self.layers[layer.name](*[env[name] for name in layer.input_names])
                env.update(zip(layer.output_names, outputs))
        if self.loss_name is not None:
            return [env[self.loss_name]]
        return [env[spec.name] for spec in self.send_specs]

    def user_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters under the user's fully-qualified names (shared ones once)."""
        params: dict[str, nn.Parameter] = {}
        for layer in self.stage_layers:
            for name, param in unwrap(self.layers[layer.name]).named_parameters():
                params.setdefault(name, param)
        return params

    def describe(self) -> str:
        """A readable summary: position, layers with strategy and parameters, what is received and sent."""
        lay = self.layout
        lines = [f"stage {lay.stage}/{lay.num_stages} rank {lay.rank} (local {lay.local} of {lay.devices_per_stage}),"
                 f" micro-batch {self.micro_batch}"]
        if self.recv_specs:
            lines.append("  recv " + ", ".join(_spec_text(s) for s in self.recv_specs))
        if self.batch_names:
            lines.append("  batch " + ", ".join(self.batch_names))
        for layer in self.stage_layers:
            module = self.layers[layer.name]
            count = sum(p.numel() for p in module.parameters())
            wrapped = "" if module is unwrap(module) else f" [{type(module).__name__}]"
            lines.append(f"  {layer.name:<8} {layer.kind:<10} {layer.layer_type:<20} {layer.strategy.short():<18}"
                         f" {count:>10,} params{wrapped}")
        if self.send_specs:
            lines.append("  send " + ", ".join(_spec_text(s) for s in self.send_specs))
        if self.loss_name:
            lines.append(f"  loss {self.loss_name}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"StageModule(\n{self.describe()}\n)"

    def dump(self, folder: str | Path) -> list[Path]:
        """Write ``stage.txt`` (the summary) and one ``<layer>.py`` with each layer's generated code."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "stage.txt"]
        written[0].write_text(self.describe() + "\n")
        for layer in self.stage_layers:
            path = folder / f"{layer.name}.py"
            path.write_text(f"# {layer.kind} {layer.layer_type}: {layer.strategy.short()}\n" + unwrap(self.layers[layer.name]).code)
            written.append(path)
        return written


def _spec_text(spec: TensorSpec) -> str:
    return f"{spec.name}{list(spec.shape)}:{str(spec.dtype).removeprefix('torch.')}"


# -- building ------------------------------------------------------------------------------------------
def stage_layer_indices(program: Program, plan: Plan, stage: int) -> list[int]:
    """Indices into ``program.layers`` of the layers that ``stage`` runs."""
    body = [layer.index for layer in program.body]
    indices = [body[i] for i in plan.stage_layers(stage)]
    if stage == 0:
        indices.insert(0, program.prologue.index)
    if stage == plan.pp - 1:
        indices.append(program.epilogue.index)
    return indices


def cut_specs(program: Program, plan: Plan, stage: int) -> tuple[TensorSpec, ...]:
    """What stage ``stage`` sends to ``stage + 1``: the live values after its last layer that a later
    layer reads (values only the model's output reads, such as logits, do not travel)."""
    last = stage_layer_indices(program, plan, stage)[-1]
    read_later = {name for layer in program.layers[last + 1:] for name in layer.input_names}
    return tuple(spec for spec in program.layers[last].boundary_out if spec.name in read_later)


def copy_layer_modules(modules: Sequence[fx.GraphModule]) -> list[fx.GraphModule]:
    """Copies with their own graphs and parameters; parameters shared between the originals stay shared."""
    clones: dict[int, Any] = {}
    return [_copy_graph_module(module, clones) for module in modules]


def _copy_graph_module(module: fx.GraphModule, clones: dict[int, Any]) -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    attrs = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = _getattr(module, node.target)
        if id(value) not in clones:
            if isinstance(value, fx.GraphModule):  # a higher-order op's body (e.g. a no-grad region)
                clones[id(value)] = _copy_graph_module(value, clones)
            elif isinstance(value, nn.Parameter):
                clones[id(value)] = nn.Parameter(value.detach().clone(), value.requires_grad)
            else:
                clones[id(value)] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        attrs[node.target] = clones[id(value)]
    return fx.GraphModule(attrs, graph, class_name=type(module).__name__)


def _getattr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def build_stage(context: LoweringContext) -> StageModule:
    """Requires: a Program captured at this rank's micro-batch size and a Plan that fits it.
    Ensures: a StageModule with copies of this stage's layers (the Program is not modified), the
    specs it receives and sends, the batch inputs it reads, and the loss name on the last stage."""
    program, plan, layout = context.program, context.plan, context.layout
    indices = stage_layer_indices(program, plan, layout.stage)
    body_position = {layer.index: i for i, layer in enumerate(program.body)}
    embed = embedding_strategy(plan)
    layers = []
    for index in indices:
        layer = program.layers[index]
        strategy = plan.layers[body_position[index]] if index in body_position else embed
        stage_layer = StageLayer(index, f"layer{index}", layer.kind, layer.layer_type, layer.input_names, layer.output_names, strategy)
        layers.append(dataclasses.replace(stage_layer, data_index=dp_index(layout_strategy(plan, stage_layer), layout.local)))
    copies = copy_layer_modules([program.layers[i].module for i in indices])
    placeholders = set(program.placeholder_names)
    batch_names = tuple(dict.fromkeys(n for layer in layers for n in layer.input_names if n in placeholders))
    return StageModule(
        layout=layout,
        layers=layers,
        modules={layer.name: module for layer, module in zip(layers, copies)},
        recv_specs=cut_specs(program, plan, layout.stage - 1) if layout.stage > 0 else (),
        send_specs=cut_specs(program, plan, layout.stage) if not layout.is_last else (),
        grad_names=program.differentiable_names(),
        batch_names=batch_names,
        loss_name=loss_name(program) if layout.is_last else None,
        micro_batch=local_micro_batch(plan, layout.stage),
        device=context.device,
    )


# -- passes ----------------------------------------------------------------------------------------------
LoweringPass = Callable[[StageModule, LoweringContext], StageModule]


def check_shapes(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: a stage rewritten for its plan. Ensures: every layer's inputs are produced before it (by the
    batch, the previous stage or an earlier layer) with the shapes its graph expects; PlanError otherwise."""
    shapes = {spec.name: spec.shape for spec in stage.recv_specs}
    shapes.update({name: None for name in stage.batch_names})
    for layer in stage.stage_layers:
        graph = unwrap(stage.layers[layer.name]).graph
        for node in graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name not in shapes:
                raise PlanError(f"{layer.name} reads {node.name}, which nothing before it on stage {context.layout.stage} provides",
                                "check pp_division against the layer table (galvatron-fx inspect)")
            value = node.meta.get("val")
            expected = shapes[node.name]
            if expected is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(expected):
                raise PlanError(f"{layer.name} expects {node.name} of shape {tuple(value.shape)}, but gets {tuple(expected)}",
                                "capture the model again with the plan's micro-batch")
        for name, produced in zip(layer.output_names, graph.output_node().args[0]):
            value = produced.meta.get("val") if isinstance(produced, fx.Node) else None
            shapes[name] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    for spec in stage.send_specs:
        if spec.name not in shapes:
            raise PlanError(f"stage {context.layout.stage} must send {spec.name} but does not compute it", "check pp_division")
    return stage


def retarget_device(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: nothing. Ensures: parameters, buffers and every device constant in the graphs (export
    records ``device='cpu'`` in casts and factory calls) are on ``context.device``."""
    device = context.device

    def move(arg: Any) -> Any:
        return device if isinstance(arg, torch.device) else arg

    for layer in stage.stage_layers:
        for module in unwrap(stage.layers[layer.name]).modules():
            if not isinstance(module, fx.GraphModule):
                continue
            for node in module.graph.nodes:
                node.args = fx.node.map_aggregate(node.args, move)
                node.kwargs = fx.node.map_aggregate(node.kwargs, move)
            module.recompile()
    if not any(p.is_meta for p in stage.parameters()):  # meta stages are materialised shard by shard later
        stage.to(device)
    return stage


def drop_metadata_asserts(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: nothing. Ensures: no ``aten._assert_tensor_metadata`` checks remain. Export records the
    dtype and device every cast saw while capturing; under autocast (bf16) or on another device these
    checks fail although the computation is right."""
    target = torch.ops.aten._assert_tensor_metadata.default
    for layer in stage.stage_layers:
        for module in unwrap(stage.layers[layer.name]).modules():
            if isinstance(module, fx.GraphModule):
                for node in list(module.graph.find_nodes(op="call_function", target=target)):
                    if not node.users:
                        module.graph.erase_node(node)
                module.recompile()
    return stage


def apply_checkpointing(stage: StageModule, context: LoweringContext) -> StageModule:
    """Requires: nothing. Ensures: every layer whose strategy has ``ckpt`` is wrapped in a CheckpointedLayer."""
    for layer in stage.stage_layers:
        if layer.strategy.ckpt and not isinstance(stage.layers[layer.name], CheckpointedLayer):
            stage.layers[layer.name] = CheckpointedLayer(stage.layers[layer.name])
    return stage


DEFAULT_PASSES: tuple[LoweringPass, ...] = (check_shapes, drop_metadata_asserts, retarget_device, apply_checkpointing)


def lower(program: Program, plan: Plan, rank: int, device: torch.device | str = "cpu",
          passes: Sequence[LoweringPass] = DEFAULT_PASSES) -> StageModule:
    """This rank's stage: ``build_stage`` followed by ``passes`` in order. Collective-free, so a plan can
    be lowered for any rank of any world in one process."""
    from galvatron_fx.passes.lower.pipeline import PARALLEL_PASSES  # imports this module

    context = LoweringContext(program, plan, RankLayout.of(plan, rank), torch.device(device))
    stage = build_stage(context)
    for lowering_pass in (*PARALLEL_PASSES, *passes):
        stage = lowering_pass(stage, context)
    return stage
