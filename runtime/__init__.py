"""Runtime: process groups, stage execution, pipeline schedules, data parallelism, launch.

Typical use under torchrun::

    device = runtime.init_distributed()
    program = galvatron_fx.capture(model, example_kwargs=micro_batch_example)
    trainer = runtime.Trainer(program, plan, device=device)
    for batch in data:
        loss = trainer.step(batch)   # the global batch on every rank, or each rank's share of it
"""

from .launch import SpawnError, init_distributed, shutdown, spawn
from .lr_schedule import LRSchedule
from .train import DistributedFailure, TrainConfig, Trainer, weight_decay_groups

__all__ = [
    "Trainer",
    "TrainConfig",
    "LRSchedule",
    "weight_decay_groups",
    "DistributedFailure",
    "init_distributed",
    "shutdown",
    "spawn",
    "SpawnError",
]
