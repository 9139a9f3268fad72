"""The pipeline schedule as a timeline: when each stage runs each micro-batch's forward and backward.

``simulate_schedule`` replays GPipe (all forwards, then all backwards) or 1F1B (``pp - stage - 1``
warm-up forwards, then one forward / one backward alternately, then the remaining backwards) with the
true dependencies — a stage's forward of micro-batch ``m`` waits for the previous stage's, its backward
for the next stage's — and puts each stage's gradient synchronisation after its last backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from galvatron_fx.errors import PlanError

FORWARD, BACKWARD, GRAD_SYNC = "forward", "backward", "grad_sync"


@dataclass(frozen=True)
class ScheduleOp:
    """One box of the timeline."""

    stage: int
    micro_batch: int  # -1 for the gradient synchronisation
    phase: str  # FORWARD | BACKWARD | GRAD_SYNC
    start_s: float
    end_s: float


def stage_order(pipeline: str, pp: int, stage: int, chunks: int) -> list[tuple[str, int]]:
    """The (phase, micro-batch) sequence one stage executes under ``pipeline``."""
    if pipeline == "gpipe":
        return [(FORWARD, m) for m in range(chunks)] + [(BACKWARD, m) for m in range(chunks)]
    if pipeline != "1f1b":
        raise PlanError(f"pipeline={pipeline!r} has no schedule", "use 'gpipe' or '1f1b'")
    warmup = min(pp - stage - 1, chunks)
    order = [(FORWARD, m) for m in range(warmup)]
    for i in range(chunks - warmup):
        order += [(FORWARD, warmup + i), (BACKWARD, i)]
    return order + [(BACKWARD, m) for m in range(chunks - warmup, chunks)]


def simulate_schedule(
    pipeline: str, chunks: int, fwd_s: Sequence[float], bwd_s: Sequence[float], grad_sync_s: Sequence[float] = ()
) -> list[ScheduleOp]:
    """Every stage's forward, backward and gradient-sync boxes, with start and end times in seconds.

    ``fwd_s[s]`` / ``bwd_s[s]``: one micro-batch's forward / backward on stage ``s`` (including its sends).
    """
    pp = len(fwd_s)
    orders = [stage_order(pipeline, pp, s, chunks) for s in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    position, free_s = [0] * pp, [0.0] * pp
    ops: list[ScheduleOp] = []
    remaining = sum(len(order) for order in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while position[s] < len(orders[s]):
                phase, m = orders[s][position[s]]
                dependency = (FORWARD, s - 1, m) if phase == FORWARD else (BACKWARD, s + 1, m)
                if 0 <= dependency[1] < pp and dependency not in done:
                    break  # wait for the neighbouring stage
                start = max(free_s[s], done.get(dependency, 0.0))
                end = start + (fwd_s[s] if phase == FORWARD else bwd_s[s])
                done[(phase, s, m)] = free_s[s] = end
                ops.append(ScheduleOp(s, m, phase, start, end))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for the two schedules above; guards against a bad order
            raise AssertionError("pipeline schedule deadlocked")
    for s in range(pp):
        sync = grad_sync_s[s] if s < len(grad_sync_s) else 0.0
        if sync > 0:
            ops.append(ScheduleOp(s, -1, GRAD_SYNC, free_s[s], free_s[s] + sync))
    return ops


def makespan_s(ops: Sequence[ScheduleOp]) -> float:
    """When the last box of the timeline ends."""
    return max((op.end_s for op in ops), default=0.0)
