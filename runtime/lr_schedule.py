"""Learning-rate schedules: constant, or a linear warm-up followed by a cosine or linear decay to a floor.

A schedule is a pure function of the optimizer step, so a resumed run (which restores the step counter) is
at the same learning rate as an uninterrupted one without saving any scheduler state. Each parameter group
keeps its own base rate (``initial_lr``, the key torch's schedulers use), so groups with different rates
are scaled alike. The values equal ``torch.optim.lr_scheduler``'s: ``LinearLR(start_factor=1 / warmup,
total_iters=warmup - 1)`` during warm-up, then ``CosineAnnealingLR(T_max=steps - warmup, eta_min=floor)``
or ``LinearLR(end_factor=floor / base, total_iters=steps - warmup)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from galvatron_fx.errors import ConfigError

ScheduleKind = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class LRSchedule:
    """``kind`` of decay after ``warmup_steps`` linear warm-up steps, reaching ``min_lr_ratio`` × the base rate
    at ``total_steps``."""

    kind: ScheduleKind = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in ("constant", "cosine", "linear"):
            raise ConfigError(f"learning-rate schedule {self.kind!r} is unknown", "use constant, cosine or linear")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}",
                "use warmup_steps >= 0 and a floor between 0 and 1 times the base rate",
            )
        if self.kind != "constant" and self.total_steps <= self.warmup_steps:
            raise ConfigError(
                f"a {self.kind} decay needs more total steps ({self.total_steps}) than warm-up steps "
                f"({self.warmup_steps})",
                "raise the number of steps or lower --warmup-steps",
            )

    def factor(self, step: int) -> float:
        """The multiple of the base rate at optimizer step ``step`` (0 for the first step)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(step - self.warmup_steps, self.total_steps - self.warmup_steps)
        progress /= self.total_steps - self.warmup_steps
        floor = self.min_lr_ratio
        if self.kind == "cosine":
            return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return 1.0 - (1.0 - floor) * progress

    @staticmethod
    def record_base_rates(optimizer: torch.optim.Optimizer) -> None:
        """Keep each group's base rate as ``initial_lr``, before any step and before a checkpoint is loaded:
        loading restores the hyperparameters a group already has, so the base rate comes back with the
        scheduled ``lr`` of the step it was saved at."""
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's rate for ``step``; returns the first group's."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return optimizer.param_groups[0]["lr"]
