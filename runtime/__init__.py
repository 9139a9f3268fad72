"""Runtime: process groups, stage execution, pipeline schedules, data parallelism, launch.

Typical use under torchrun::

    device = runtime.init_distributed()
    program = galvatron_fx.capture(model, example_kwargs=micro_batch_example)
    trainer = runtime.Trainer(program, plan, device=device)
    for batch in data:
        loss = trainer.step(batch)   # the global batch, the same on every rank
"""

from .launch import SpawnError, init_distributed, shutdown, spawn
from .train import DistributedFailure, TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "DistributedFailure", "init_distributed", "shutdown", "spawn", "SpawnError"]
