"""The training step: a Program and a Plan become, on each rank, a stage that trains.

``Trainer(program, plan)`` checks the plan against the program and the world (before any collective),
lowers this rank's stage, creates the process groups, wraps layers for data parallelism and builds the
optimizer. ``trainer.step(batch)`` takes the *global* batch (the same on every rank) or this rank's *local
share* of it (``global_batch / devices_per_stage`` samples: the block at its data-parallel index, what
``galvatron_fx.data.ShardedLoader`` hands it), splits it into micro-batches, runs the pipeline schedule,
synchronises gradients, clips them by their global norm, steps the optimizer at the scheduled learning rate
and returns the loss of the global batch on every rank.

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
from galvatron_fx.passes.lower.ops.random import eval_obstacles, layer_seed, without_dropout
from galvatron_fx.passes.lower.pipeline import LOWERING_PASSES, lower
from galvatron_fx.passes.lower.stage import StageModule, unwrap
from galvatron_fx.plan import Plan
from galvatron_fx.program import Program

from . import groups
from .compiled_layers import compile_layers
from .data_parallel import GradSync, apply_data_parallel, prepare_groups
from .executor import StageExecutor
from .grad_norm import GlobalGradNorm
from .lr_schedule import LRSchedule
from .schedules import SCHEDULES, Action
from .shard_maps import unshard_parameters

# parameter groups, each {"params": [(name, parameter), ...]} (torch's named form) → optimizer
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


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
    (``runtime.compiled_layers``); ``clip_grad_norm``: the largest global gradient norm (``runtime.grad_norm``;
    None: no clipping); ``weight_decay``: the default optimizer becomes AdamW, decaying every parameter but
    biases and norms (``weight_decay_groups``); ``lr_schedule``: the rate at each step, a multiple of each
    group's base rate (``runtime.lr_schedule``)."""

    lr: float = 1e-3
    seed: int | None = 0
    mixed_precision: str = "fp32"
    compile_layers: bool = False
    clip_grad_norm: float | None = None
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = LRSchedule()

    def __post_init__(self):
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} is unknown", "use 'fp32' or 'bf16'")


def parameter_groups(stage: StageModule) -> list[dict[str, Any]]:
    """The stage's parameters as optimizer parameter groups of ``(user name, parameter)`` pairs, one group per
    kind of tensor: FSDP2's DTensors apart from plain tensors (weights kept out of sharding, tensor-parallel
    shards). The optimizers' fused and ``foreach`` paths (the default on CUDA) refuse a list that mixes the
    two."""
    named = list(stage.user_parameters().items())
    kinds = [
        [(n, p) for n, p in named if isinstance(p, DTensor)],
        [(n, p) for n, p in named if not isinstance(p, DTensor)],
    ]
    return [{"params": group} for group in kinds if group]


def weight_decay_groups(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Each named group split into one that decays at ``weight_decay`` and one that does not: biases and
    normalisation weights (parameters of fewer than two dimensions, whatever their shard) are not decayed,
    as in GPT-2, Megatron-LM and nanoGPT."""
    out = []
    for group in groups:
        for decays in (True, False):
            params = [(n, p) for n, p in group["params"] if (p.dim() >= 2) == decays]
            if params:
                out.append({**group, "params": params, "weight_decay": weight_decay if decays else 0.0})
    return out


def default_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam at ``config.lr``; AdamW with ``weight_decay_groups`` when ``config.weight_decay`` is set. On GPUs
    the fused kernel: one launch per group and no fp32 temporary of the updated parameters, which the
    multi-tensor default would hold during the step (the cost model prices the fused step)."""
    fused = all(p.is_cuda for group in groups for _, p in group["params"]) or None
    if config.weight_decay:
        return torch.optim.AdamW(weight_decay_groups(groups, config.weight_decay), lr=config.lr, fused=fused)
    return torch.optim.Adam(groups, lr=config.lr, fused=fused)


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
        self.optimizer = optimizer(param_groups) if optimizer else default_optimizer(param_groups, config)
        LRSchedule.record_base_rates(self.optimizer)
        self.grad_norm = GlobalGradNorm(self.stage, sorted(program.parameter_shapes()), self.device)
        stage = self.stage.position.stage
        self.actions = SCHEDULES[plan.pipeline](plan.pp, stage, plan.chunks)
        bf16 = torch.bfloat16 if config.mixed_precision == "bf16" else None
        self.executor = StageExecutor(self.stage, self.sync, plan.chunks, self.device, bf16)
        self.steps_done = 0
        self.last_grad_norm: torch.Tensor | None = None  # of the last step, before clipping (on the device)
        self.last_lr: float = self.optimizer.param_groups[0]["lr"]

    # -- data --------------------------------------------------------------------------------------------
    @property
    def local_batch(self) -> int:
        """Samples of this rank's local share of a global batch (the data-parallel block it reads)."""
        return self.plan.global_batch // self.plan.devices_per_stage

    @property
    def data_index(self) -> int:
        """Which block of each global batch this rank reads (its index among its stage's devices)."""
        return self.stage.position.local

    def micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """This rank's micro-batches of ``batch``: the global batch (whose data-parallel block it keeps) or
        its local share (kept whole), cut along dim 0 into ``chunks`` pieces; values without the batch
        dimension are passed to every micro-batch."""
        plan = self.plan
        flat = self.program.flatten_inputs((), batch)
        batched = {
            name: value
            for name in self.stage.batch_names
            if isinstance(value := flat[name], torch.Tensor) and value.dim() > 0
        }
        sizes = {name: value.shape[0] for name, value in batched.items()}
        if (
            any(size not in (plan.global_batch, self.local_batch) for size in sizes.values())
            or len(set(sizes.values())) > 1
        ):
            raise PlanError(
                f"batch inputs have {sizes} samples; the plan's global batch is {plan.global_batch}, and this "
                f"rank's share of it {self.local_batch}",
                "pass every rank the whole global batch, or each rank its own share (compiled.data_loader "
                "hands out the shares), or change the plan's global_batch",
            )
        out: list[dict[str, Any]] = [{} for _ in range(plan.chunks)]
        for name in self.stage.batch_names:
            value = flat[name]
            if name in batched:
                if value.shape[0] != self.local_batch:  # the global batch: keep this rank's block
                    value = value[self.data_index * self.local_batch : (self.data_index + 1) * self.local_batch]
                for i, piece in enumerate(value.to(self.device, non_blocking=True).chunk(plan.chunks)):
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
    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on ``batch`` (the global batch or this rank's share of it); returns the mean loss
        of the global batch (the same on every rank) as a 0-dim float32 tensor on the device. Nothing in the
        step waits for the device, so the host queues the next step while this one runs; reading the loss
        (``float``, ``.item()``) waits for it, so read it every few steps, as ``galvatron-fx train`` does at
        ``--log-every``. The gradient's global norm before clipping is left in ``last_grad_norm`` (a device
        tensor too) and the rate used in ``last_lr``."""
        micro_batches = self.micro_batches(batch)  # user errors surface here, before any communication
        config = self.config
        with self._communication_errors():
            losses = self.executor.run(self.actions, micro_batches, self._seeds())
            self.sync.finish()
            clip = config.clip_grad_norm
            self.last_grad_norm = self.grad_norm.clip_(clip) if clip is not None else self.grad_norm.norm()
            if config.lr_schedule != LRSchedule():
                self.last_lr = config.lr_schedule.apply(self.optimizer, self.steps_done)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._global_loss(losses)
        self.steps_done += 1
        return loss

    def evaluate(self, batch: dict[str, Any]) -> float:
        """The mean loss of ``batch`` (global, or this rank's share) as the model's ``eval()`` computes it:
        forwards only, dropout off, no gradients, nothing updated."""
        micro_batches = self.micro_batches(batch)
        obstacles = [
            f"{layer.name}: {op}"
            for layer in self.stage.stage_layers
            for op in eval_obstacles(unwrap(self.stage.layers[layer.name]))
        ]
        if obstacles:
            raise ConfigError(
                f"evaluation cannot turn off these random ops, which are not dropout: {obstacles}",
                "build the model for evaluation with them disabled in its config (drop_path_rate=0, say)",
            )
        forwards = tuple(Action("F", i) for i in range(self.plan.chunks))
        with self._communication_errors(), torch.no_grad(), without_dropout():
            losses = self.executor.run(forwards, micro_batches, self._seeds())
            self.sync.reshard()
            return float(self._global_loss(losses))

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

    def _global_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        # the last stage's ranks each hold the mean over their slice; one world all-reduce gives everyone the mean
        total = torch.zeros((), device=self.device)
        if losses:
            total += torch.stack(losses).mean() / self.plan.devices_per_stage
        dist.all_reduce(total)
        return total

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
