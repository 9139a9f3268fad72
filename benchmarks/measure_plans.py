"""Plans trained and timed on fresh processes, for the accuracy and plan-quality benchmarks: one rank's worker
(``run_plans``: step times, peak bytes and stage per plan) and the rounds that alternate the plans' order
(``measure_in_rounds``)."""

from __future__ import annotations

import gc
import warnings
from typing import Any, Callable

import torch

from benchmarks.common import build_model, spawn, time_steps, trainer_peak_bytes
from galvatron_fx.plan import Plan

GLOBAL_BATCH = 8


class Trainers:
    """Trainers of one model for several plans on this rank's device; the model is captured once per local
    micro-batch size."""

    def __init__(self, model_name: str, shape: str, global_batch: int):
        from galvatron_fx.runtime import groups

        self.device = groups.current_device()
        model, batch = build_model(model_name, shape, global_batch)
        self.model = model.to(self.device)
        self.batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.programs: dict[int, Any] = {}

    def __call__(self, plan: Plan):
        from galvatron_fx import capture
        from galvatron_fx.passes.lower.stage import local_micro_batch
        from galvatron_fx.runtime import Trainer

        local = local_micro_batch(plan)
        if local not in self.programs:
            example = {k: v[:local] if isinstance(v, torch.Tensor) else v for k, v in self.batch.items()}
            self.programs[local] = capture(self.model, example_kwargs=example)
        return Trainer(self.programs[local], plan, device=self.device)


def run_plans(
    rank: int,
    world: int,
    model_name: str,
    shape: str,
    cases: list[tuple[str, Plan]],
    warmup: int,
    repeats: int,
    global_batch: int = GLOBAL_BATCH,
    measure_memory: bool = True,
) -> list[dict]:
    """Spawned worker: train every plan; per plan the step times, the peak bytes (None without
    ``measure_memory``) and this rank's stage."""
    from galvatron_fx.errors import GalvatronError

    warnings.simplefilter("ignore")
    trainers = Trainers(model_name, shape, global_batch)
    device, batch, out = trainers.device, trainers.batch, []
    for name, plan in cases:
        try:
            trainer = trainers(plan)
        except GalvatronError as error:  # raised on every rank alike, before any collective: report, go on
            out.append({"plan": name, "rank": rank, "error": f"{type(error).__name__}: {str(error)[:400]}"})
            continue
        step = lambda: trainer.step(batch)  # noqa: E731
        times = time_steps(step, device, warmup, repeats)
        peak = trainer_peak_bytes(trainer, batch) if measure_memory else None
        out.append(
            {"plan": name, "rank": rank, "stage": trainer.stage.position.stage, "times_s": times, "peak_bytes": peak}
        )
        trainer = step = None  # the plan's state goes before the next plan's is built
        gc.collect()
    return out


def measure_in_rounds(
    model_name: str,
    shape: str,
    cases_by_world: dict[int, list[tuple[str, Plan]]],
    warmup: int,
    repeats: int,
    rounds: int,
    after_round: Callable[[], Any] = lambda: None,
) -> dict[int, list[list[dict]]]:
    """Per world, per rank: every plan's results, its step times pooled over ``rounds`` rounds; ``after_round()``
    runs after each. One process launch per plan and round: state a runtime leaves behind (caches, hooks)
    must not reach the next plan's memory or time. Every other round runs the plans in reverse order, so
    that each plan's measurements centre on the middle of the run, as profile passes spread over it do; the
    machine's speed drifts by up to a quarter over minutes. Memory is measured in the first round (it does
    not drift)."""
    order = [(world, case) for world, cases in cases_by_world.items() for case in cases]
    pooled: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(rounds):
        for world, case in order if round_ % 2 == 0 else order[::-1]:
            ranks = spawn(run_plans, world, model_name, shape, [case], warmup, repeats, GLOBAL_BATCH, round_ == 0)
            results = [r for rank in ranks for r in rank]
            if (world, case[0]) not in pooled:
                pooled[(world, case[0])] = results
            elif not any("error" in r for r in results):
                for first, again in zip(pooled[(world, case[0])], results):
                    first["times_s"] = first["times_s"] + again["times_s"]
        after_round()
    return {
        world: [[pooled[(world, name)][rank] for name, _ in cases] for rank in range(world)]
        for world, cases in cases_by_world.items()
    }
