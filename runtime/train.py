"""The training step: a Program and a Plan become, on each rank, a stage that trains.

``Trainer(program, plan)`` checks the plan against the program and the world (before any collective),
lowers this rank's stage, creates the process groups, wraps layers for data parallelism and builds the
optimizer. ``trainer.step(batch)`` takes the *global* batch (the same on every rank), keeps this rank's
data-parallel slice, splits it into micro-batches, runs the pipeline schedule, synchronises gradients,
steps the optimizer and returns the loss of the global batch on every rank.

The loss is the mean over the global batch: each micro-batch's loss is scaled by ``1 / chunks`` before
backward, data-parallel gradients are averaged over ``dp``, so with equal token counts per sample the
gradients equal those of one process on the whole batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from galvatron_fx.errors import ConfigError, PlanError
from galvatron_fx.passes.infra import Pass
from galvatron_fx.passes.lower.ops.random import layer_seed
from galvatron_fx.passes.lower.pipeline import LOWERING_PASSES, lower
from galvatron_fx.passes.lower.stage import StageModule
from galvatron_fx.plan import Plan
from galvatron_fx.program import Program

from . import groups
from .compiled_layers import compile_layers
from .data_parallel import GradSync, apply_data_parallel, prepare_groups
from .executor import StageExecutor
from .schedules import SCHEDULES, Action
from .shard_maps import unshard_parameters

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]  # parameter groups → optimizer


class DistributedFailure(RuntimeError):
    """A collective or transfer failed during a step, most often because another rank died."""


def _is_communication_error(error: BaseException) -> bool:
    """Errors of collectives and transfers (a peer closed its connection, a timeout), not of the model."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return any(
        marker in text
        for marker in ("gloo", "Gloo", "NCCL", "Connection", "connection", "timed out", "Timeout", "peer")
    )


@dataclass(frozen=True)
class TrainConfig:
    """``lr`` for the default Adam optimizer; ``seed`` makes dropout depend on (seed, step, micro-batch, layer,
    the samples a rank holds there, the shard it holds) only, so not on the pipeline division or checkpointing,
    and alike on the ranks that hold the same activation (``passes.lower.graph.random_streams``; None: the
    generators' state as it is); ``mixed_precision``: ``"fp32"`` or ``"bf16"``: the stage runs under bf16
    autocast, ZeRO layers gather bf16 parameters and reduce fp32 gradients, pipeline messages are bf16;
    parameters, gradients and optimizer states stay fp32 (``cost/memory.py`` prices this layout);
    ``compile_layers``: each kind of layer graph compiled once with ``torch.compile``
    (``runtime.compiled_layers``)."""

    lr: float = 1e-3
    seed: int | None = 0
    mixed_precision: str = "fp32"
    compile_layers: bool = False

    def __post_init__(self):
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} is unknown", "use 'fp32' or 'bf16'")


def parameter_groups(stage: StageModule) -> list[dict[str, Any]]:
    """The stage's parameters as optimizer parameter groups, one per kind of tensor: FSDP2's DTensors apart
    from plain tensors (weights kept out of sharding, tensor-parallel shards). The optimizers' fused and
    ``foreach`` paths (the default on CUDA) refuse a list that mixes the two."""
    params = list(stage.parameters())
    kinds = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [{"params": group} for group in kinds if group]


class Trainer:
    """One rank's share of training ``program`` under ``plan``."""

    def __init__(
        self,
        program: Program,
        plan: Plan,
        *,
        config: TrainConfig = TrainConfig(),
        optimizer: OptimizerFactory | None = None,
        device: torch.device | str | None = None,
        model_name: str | None = None,
        passes: tuple[Pass[StageModule], ...] = LOWERING_PASSES,
    ):
        if not dist.is_initialized():
            raise ConfigError(
                "torch.distributed is not initialised", "call runtime.init_distributed() (under torchrun) first"
            )
        plan.check_fits(len(program.body), dist.get_world_size(), model_name)
        self.program, self.plan, self.config = program, plan, config
        self.device = torch.device(device) if device is not None else groups.current_device()
        self.stage: StageModule = lower(
            program, plan, dist.get_rank(), self.device, passes
        )  # raises before collectives
        prepare_groups(program, plan)
        self.sync: GradSync = apply_data_parallel(self.stage, program, plan, config.mixed_precision)
        if config.compile_layers:
            compile_layers(self.stage)
        param_groups = parameter_groups(self.stage)
        self.optimizer = optimizer(param_groups) if optimizer else torch.optim.Adam(param_groups, lr=config.lr)
        stage = self.stage.position.stage
        self.actions = SCHEDULES[plan.pipeline](plan.pp, stage, plan.chunks)
        bf16 = torch.bfloat16 if config.mixed_precision == "bf16" else None
        self.executor = StageExecutor(self.stage, self.sync, plan.chunks, self.device, bf16)
        self.steps_done = 0

    # -- data --------------------------------------------------------------------------------------------
    def micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """This rank's micro-batches of the global ``batch``: its data-parallel slice along dim 0, in
        ``chunks`` pieces; values without the batch dimension are passed to every micro-batch."""
        plan, position = self.plan, self.stage.position
        flat = self.program.flatten_inputs((), batch)
        dp = plan.devices_per_stage  # tp == 1: the data-parallel index is the local index
        per_rank = plan.global_batch // dp
        out: list[dict[str, Any]] = [{} for _ in range(plan.chunks)]
        for name in self.stage.batch_names:
            value = flat[name]
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape[0] != plan.global_batch:
                    raise PlanError(
                        f"batch input {name} has {value.shape[0]} samples, the plan's global batch is "
                        f"{plan.global_batch}",
                        "pass the whole global batch to every rank, or change the plan's global_batch",
                    )
                mine = value[position.local * per_rank : (position.local + 1) * per_rank].to(self.device)
                for i, piece in enumerate(mine.chunk(plan.chunks)):
                    out[i][name] = piece
            else:
                for piece in out:
                    piece[name] = value
        return out

    def _seeds(self) -> list[int | None]:
        if self.config.seed is None:
            return [None] * self.plan.chunks
        # each layer adds itself and the block of samples this rank holds there (passes.lower.graph.random_streams)
        return [layer_seed(self.config.seed, self.steps_done, i) for i in range(self.plan.chunks)]

    # -- step --------------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> float:
        """One optimizer step on the global ``batch``; returns its mean loss (the same on every rank)."""
        micro_batches = self.micro_batches(batch)  # user errors surface here, before any communication
        with self._communication_errors():
            losses = self.executor.run(self.actions, micro_batches, self._seeds())
            self.sync.finish()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._global_loss(losses)
        self.steps_done += 1
        return loss

    def evaluate(self, batch: dict[str, Any]) -> float:
        """The mean loss of the global ``batch``: forwards only, no gradients, nothing updated. The graph
        runs as captured (training mode), so dropout applies if the model has any."""
        micro_batches = self.micro_batches(batch)
        forwards = tuple(Action("F", i) for i in range(self.plan.chunks))
        with self._communication_errors(), torch.no_grad():
            return self._global_loss(self.executor.run(forwards, micro_batches, self._seeds()))

    @contextlib.contextmanager
    def _communication_errors(self):
        """A failed collective or transfer (most often: another rank died) becomes a DistributedFailure."""
        try:
            yield
        except RuntimeError as error:
            if not _is_communication_error(error):
                raise
            position = self.stage.position
            raise DistributedFailure(
                f"rank {position.rank} (stage {position.stage}) failed in step {self.steps_done}: "
                f"{type(error).__name__}: {str(error).strip()[:500]}. If another rank died, its report "
                "names the cause"
            ) from error

    def _global_loss(self, losses: list[torch.Tensor]) -> float:
        # the last stage's ranks each hold the mean over their slice; one world all-reduce gives everyone the mean
        total = torch.zeros((), device=self.device)
        if losses:
            total += torch.stack(losses).mean() / self.plan.devices_per_stage
        dist.all_reduce(total)
        return float(total)

    # -- inspection ----------------------------------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """This stage's parameters, unsharded, under the user's names, on the CPU. Collective over the
        stage's data-parallel groups: every rank of the stage must call it."""
        out = {}
        for name, param in self.stage.user_parameters().items():
            value = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = value.detach().cpu().clone()
        return unshard_parameters(self.stage, out)  # tensor-parallel shards made whole

    def describe(self) -> str:
        return self.stage.describe() + "\n  " + self.sync.describe()
