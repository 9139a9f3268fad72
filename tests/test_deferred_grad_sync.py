"""ZeRO with gradients accumulated over micro-batches: FSDP2 holds each layer's unsharded gradient from the
first backward to the last, and the cost model prices it (``Plan.defers_grad_sync``). Predicted against
measured peak memory on 2 gloo processes, 4 micro-batches, fp32 (ZeRO-2 also checkpointed), and with a sync
after every micro-batch."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch

from galvatron_fx import Cluster, LayerStrategy, Plan, capture, runtime
from galvatron_fx.compile import build_cost_model
from galvatron_fx.models import build_model, example_batch

WORLD, BATCH, SEQ, CHUNKS = 2, 8, 24, 4
# peaks are deterministic: within 4 %, where counting the unsharded gradients twice under deferred sync (once
# held, once in the backward's transient) read 4.7 to 5.9 % over
PEAK_TOLERANCE = 0.045
CASES = {
    "zero2": dict(dp_type="zero2", every=False),
    "zero3": dict(dp_type="zero3", every=False),
    "zero2_ckpt": dict(dp_type="zero2", every=False, ckpt=True),
    "zero3_sync_every_micro_batch": dict(dp_type="zero3", every=True),
}


def peak_worker(rank: int, world_size: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the peak meter lives in benchmarks/
    from benchmarks.common import trainer_peak_bytes

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, _ = build_model("gpt2", batch=BATCH, seq=SEQ)
    batch = example_batch("gpt2", model, BATCH, SEQ, seed=0)
    program = capture(model, example_kwargs=batch)
    cost_model = build_cost_model(program, Cluster.detect(), "analytic", "fp32")
    out = {}
    for name, case in CASES.items():
        layers = (LayerStrategy(dp=WORLD, dp_type=case["dp_type"], ckpt=case.get("ckpt", False)),) * len(program.body)
        plan = Plan(
            world_size=WORLD,
            layers=layers,
            chunks=CHUNKS,
            global_batch=BATCH,
            grad_sync_every_micro_batch=case["every"],
        )
        trainer = runtime.Trainer(program, plan)
        trainer.step(batch)
        out[name] = {
            "measured": trainer_peak_bytes(trainer, batch),
            "predicted": cost_model.evaluate(plan).memory_bytes_per_stage[0],
        }
    return out


@functools.cache
def _results():
    return runtime.spawn(peak_worker, WORLD, timeout_s=900)


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_peak_matches_the_measured_one(name):
    for rank in _results():
        measured, predicted = rank[name]["measured"], rank[name]["predicted"]
        print(f"{name}: predicted / measured peak {predicted / measured:.3f}")
        assert abs(predicted / measured - 1) <= PEAK_TOLERANCE, (predicted, measured)


def test_deferred_sync_costs_the_unsharded_gradients():
    result = _results()[0]
    deferred, every = result["zero3"]["predicted"], result["zero3_sync_every_micro_batch"]["predicted"]
    assert deferred > every  # the same activations, and the whole gradient held besides
