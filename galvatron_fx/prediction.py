"""Prediction: what the cost model predicts for a plan (time, throughput, memory per stage), kept with the plan
(``Plan.prediction``) and written into its JSON."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for a plan, in the runtime's own terms."""

    iteration_time_s: float
    samples_per_s: float
    memory_bytes_per_stage: tuple[int, ...]
    # what the search checks against the memory budget: an upper bound on memory_bytes_per_stage that adds
    # up layer by layer (cost/memory.py); empty where not recorded (then the prediction itself counts)
    memory_bound_bytes_per_stage: tuple[int, ...] = ()

    @property
    def budgeted_bytes_per_stage(self) -> tuple[int, ...]:
        """Each stage's bytes as the search budgets them."""
        return self.memory_bound_bytes_per_stage or self.memory_bytes_per_stage

    @property
    def budgeted_bytes(self) -> int:
        """The largest stage's bytes as the search budgets them."""
        return max(self.budgeted_bytes_per_stage)
