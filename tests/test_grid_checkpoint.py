"""Checkpoints across tensor-parallel modes: GPT-2 trained under a 2D grid on 4 ranks (parameters held as
blocks over the grid's rows and columns) saves, then the same ranks load it under 1D tensor parallelism and under
tp 2 × dp 2 and must continue with the uninterrupted run's losses; and a checkpoint saved under 1D loads under
the grid. Right after loading, the parameters are exactly those saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import galvatron_fx
from galvatron_fx.models import build_model, example_batch
from galvatron_fx.runtime import spawn

STEPS_BEFORE, STEPS_AFTER = 2, 3
BATCH, SEQ = 8, 16
GRID = dict(tp=4, tp_mode="2d")


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3, eps=1e-6)


def _batches():
    torch.manual_seed(0)
    model, _ = build_model("gpt2")
    pair = [example_batch("gpt2", model, BATCH, SEQ, seed=i) for i in range(2)]
    return model, [pair[i % 2] for i in range(STEPS_BEFORE + STEPS_AFTER)]


def _compile(flags: dict, batch, model=None):
    if model is None:
        torch.manual_seed(123)  # other weights: only the checkpoint can make the losses match
        model, _ = build_model("gpt2")
    return galvatron_fx.compile(model, example_kwargs=batch, plan=galvatron_fx.uniform_plan(**flags), optimizer=_adam)


def _train_save_continue(flags: dict, folder: Path, model, batches) -> dict:
    compiled = _compile(flags, batches[0], model)
    before = [float(compiled.train_step(b)) for b in batches[:STEPS_BEFORE]]
    compiled.save_checkpoint(folder)
    saved = compiled.trainer.full_parameters()
    return {
        "before": before,
        "saved": saved,
        "reference": [float(compiled.train_step(b)) for b in batches[STEPS_BEFORE:]],
    }


def _across_modes(rank: int, world: int, root: str) -> dict:
    model, batches = _batches()
    out = {"grid": _train_save_continue(GRID, Path(root) / "grid", model, batches)}
    for name, flags in (("tp4", dict(tp=4)), ("tp2_dp2", dict(tp=2))):
        other = _compile(flags, batches[0])
        other.load_checkpoint(Path(root) / "grid")
        loaded = other.trainer.full_parameters()
        out[name] = {
            "max_param_diff": max(float((loaded[k] - out["grid"]["saved"][k]).abs().max()) for k in loaded),
            "losses": [float(other.train_step(b)) for b in batches[STEPS_BEFORE:]],
        }
    model, batches = _batches()
    out["tp4"]["reference"] = _train_save_continue(dict(tp=4), Path(root) / "tp4", model, batches)["reference"]
    grid = _compile(GRID, batches[0])
    grid.load_checkpoint(Path(root) / "tp4")
    out["grid_from_tp4"] = [float(grid.train_step(b)) for b in batches[STEPS_BEFORE:]]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(_across_modes, 4, str(tmp_path_factory.mktemp("grid_checkpoints")), timeout_s=600)


def test_a_grid_checkpoint_loads_under_1d_tensor_parallelism(results):
    for out in results:
        reference = out["grid"]["reference"]
        assert reference[-1] < out["grid"]["before"][0] - 0.01  # it trains
        for name in ("tp4", "tp2_dp2"):
            assert out[name]["max_param_diff"] == 0.0, name  # the saved values, resharded from blocks
            assert out[name]["losses"] == pytest.approx(reference, abs=1e-5), name


def test_a_1d_checkpoint_loads_under_a_grid(results):
    for out in results:
        assert out["grid_from_tp4"] == pytest.approx(out["tp4"]["reference"], abs=1e-5)
