"""A rank's pipeline stage as an nn.Module built from the Program's layer graphs, and how it is built.

Stage ``s`` runs body layers ``plan.stage_layers(s)``; the first stage also runs the prologue, the last one
the epilogue (and so the loss); ranks are placed by ``galvatron_fx.parallel_dims``. ``build_stage`` copies the
stage's layer graphs (the Program is never modified) and records what crosses its cuts; the lowering passes
(``passes.lower.pipeline``) then rewrite those copies for the plan, and the runtime applies data parallelism.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import copy_layer_modules
from galvatron_fx.parallel_dims import RankPosition, dp_index, embedding_strategy, layout_strategy
from galvatron_fx.passes.lower.ops.random import layer_seed, seed_generators
from galvatron_fx.passes.lower.ops.redistribute import shared_conversions
from galvatron_fx.passes.lower.ops.regather import regather_saved
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import Program, TensorSpec


@dataclass(frozen=True)
class LoweringContext:
    """What every lowering pass may read."""

    program: Program
    plan: Plan
    position: RankPosition
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


def local_micro_batch(plan: Plan, stage: int = 0) -> int:
    """Samples each rank of ``stage`` receives per micro-batch: ``global_batch / chunks / devices_per_stage``
    (layers with tensor parallelism run a larger batch: ``passes.lower.pipeline.layer_batch``)."""
    return plan.micro_batch // plan.devices_per_stage


def loss_name(program: Program) -> str:
    """The graph value that is the loss: the output keyed ``loss``, else the only scalar float output."""
    names = program.output_names
    context = getattr(program.out_spec, "context", None)
    if isinstance(context, (list, tuple)) and "loss" in context and len(context) == len(names):
        return names[list(context).index("loss")]
    values = {n.name: n.meta.get("val") for n in program.graph_module.graph.nodes}
    scalars = [
        name
        for name in names
        if isinstance(values.get(name), torch.Tensor) and values[name].dim() == 0 and values[name].is_floating_point()
    ]
    if len(scalars) != 1:
        raise PlanError(
            f"cannot tell which output of {program.model_name} is the loss (scalar outputs: {scalars})",
            "return the loss from forward (as 'loss' of a dict/ModelOutput, or as the only scalar)",
        )
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

    def __init__(
        self,
        position: RankPosition,
        layers: Sequence[StageLayer],
        modules: dict[str, nn.Module],
        recv_specs: tuple[TensorSpec, ...],
        send_specs: tuple[TensorSpec, ...],
        batch_names: tuple[str, ...],
        loss_name: str | None,
        micro_batch: int,
        grad_names: frozenset[str] = frozenset(),
        device: torch.device = torch.device("cpu"),
    ):
        super().__init__()
        self.position = position
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
        with shared_conversions():  # a value several layers read in one layout moves once
            for layer in self.stage_layers:
                if seed is not None:  # random draws depend on (seed, layer, samples held), not on the stage
                    seed_generators(layer_seed(seed, layer.index, layer.data_index), self.device)
                # what a grid or Megatron-SP layer gathers is saved as the blocks and gathered again in backward
                gathers = layer.strategy.tp_mode != "1d" or layer.strategy.sp == "megatron"
                regather = regather_saved() if gathers else contextlib.nullcontext()
                with regather:
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
        lay = self.position
        lines = [
            f"stage {lay.stage}/{lay.num_stages} rank {lay.rank} (local {lay.local} of {lay.devices_per_stage}),"
            f" micro-batch {self.micro_batch}"
        ]
        if self.recv_specs:
            lines.append("  recv " + ", ".join(_spec_text(s) for s in self.recv_specs))
        if self.batch_names:
            lines.append("  batch " + ", ".join(self.batch_names))
        for layer in self.stage_layers:
            module = self.layers[layer.name]
            count = sum(p.numel() for p in module.parameters())
            wrapped = "" if module is unwrap(module) else f" [{type(module).__name__}]"
            lines.append(
                f"  {layer.name:<8} {layer.kind:<10} {layer.layer_type:<20} {layer.strategy.short():<18}"
                f" {count:>10,} params{wrapped}"
            )
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
            path.write_text(
                f"# {layer.kind} {layer.layer_type}: {layer.strategy.short()}\n" + unwrap(self.layers[layer.name]).code
            )
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
    read_later = {name for layer in program.layers[last + 1 :] for name in layer.input_names}
    return tuple(spec for spec in program.layers[last].boundary_out if spec.name in read_later)


def build_stage(context: LoweringContext) -> StageModule:
    """A StageModule with copies of this stage's layers (the Program is not modified), each with its strategy
    and the block of samples this rank holds there, the specs it receives and sends (at the captured batch),
    the batch inputs it reads, and the loss name on the last stage."""
    program, plan, position = context.program, context.plan, context.position
    indices = stage_layer_indices(program, plan, position.stage)
    body_position = {layer.index: i for i, layer in enumerate(program.body)}
    embed = embedding_strategy(plan.embedding, plan.devices_per_stage)
    layers = []
    for index in indices:
        layer = program.layers[index]
        strategy = plan.layers[body_position[index]] if index in body_position else embed
        layout = layout_strategy(layer.kind, strategy, plan.devices_per_stage, plan.embedding)
        data_index = dp_index(layout, position.local)
        layers.append(
            StageLayer(
                index,
                f"layer{index}",
                layer.kind,
                layer.layer_type,
                layer.input_names,
                layer.output_names,
                strategy,
                data_index,
            )
        )
    copies = copy_layer_modules([program.layers[i].module for i in indices])
    placeholders = set(program.placeholder_names)
    batch_names = tuple(dict.fromkeys(n for layer in layers for n in layer.input_names if n in placeholders))
    return StageModule(
        position=position,
        layers=layers,
        modules={layer.name: module for layer, module in zip(layers, copies)},
        recv_specs=cut_specs(program, plan, position.stage - 1) if position.stage > 0 else (),
        send_specs=cut_specs(program, plan, position.stage) if not position.is_last else (),
        grad_names=program.differentiable_names(),
        batch_names=batch_names,
        loss_name=loss_name(program) if position.is_last else None,
        micro_batch=local_micro_batch(plan, position.stage),
        device=context.device,
    )
