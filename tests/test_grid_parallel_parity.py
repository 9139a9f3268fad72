"""Parity with single-process eager training for grid tensor parallelism (fp32, dropout 0, 5 steps, Adam and
SGD) on GPT-2, LLaMA, BERT and ViT: 2D on 4 ranks, 2.5D (q=2, depth 2) and 3D (q=2) on 8, 2D under a 2-stage
pipeline on 8, 2D with two data-parallel replicas under ZeRO-3, a plan whose layers alternate 1D, 2D and
plain data parallelism (redistribution between them), and 2D and 3D layers recomputed beside ones that are not
(what a layer gathers is saved as blocks unless it is recomputed). Sharded parameters come back whole and must equal
eager's; SGD catches a wrong averaging factor over the grid's groups (Adam's normalisation hides it).
"""

from __future__ import annotations

import functools
import warnings

import pytest
from distributed import (
    GLOBAL_BATCH,
    _config,
    _program,
    check_parity,
    optimizer_factory,
    shared_runs,
    tier_params,
    train_cases,
)

from galvatron_fx.plan import LayerStrategy, Plan

GRID_2D = dict(tp=4, tp_mode="2d")
GRID_25D = dict(tp=8, tp_mode="2.5d", tp_depth=2)
GRID_3D = dict(tp=8, tp_mode="3d")
# name → (world size, pp, chunks, per-layer pattern of LayerStrategy keywords without dp)
RECIPES = {
    "2d": (4, 1, 1, (GRID_2D,)),
    "2.5d": (8, 1, 1, (GRID_25D,)),
    "3d": (8, 1, 1, (GRID_3D,)),
    "pp2_2d": (8, 2, 2, (GRID_2D,)),
    "2d_dp2_zero3": (8, 1, 1, ({**GRID_2D, "dp_type": "zero3"},)),
    "mixed": (4, 1, 1, (GRID_2D, dict(tp=4), dict(tp=1), dict(tp=2), GRID_2D)),
    # recomputed layers beside ones that save their gathered blocks (passes/lower/ops/regather.py)
    "2d_ckpt": (4, 1, 1, ({**GRID_2D, "ckpt": True}, GRID_2D)),
    "3d_ckpt": (8, 1, 1, ({**GRID_3D, "ckpt": True}, GRID_3D)),
}


def make_plan(recipe: str, num_layers: int, model: str) -> Plan:
    world, pp, chunks, pattern = RECIPES[recipe]
    devices = world // pp
    layers = tuple(
        LayerStrategy(dp=devices // pattern[i % len(pattern)]["tp"], **pattern[i % len(pattern)])
        for i in range(num_layers)
    )
    return Plan(
        world_size=world, layers=layers, pp=pp, chunks=chunks, global_batch=GLOBAL_BATCH, provenance={"model": model}
    )


MODELS = ("gpt2", "llama", "bert", "vit")
FAST = {
    4: [
        ("gpt2", "2d+sgd"),
        ("llama", "2d"),
        ("bert", "2d"),
        ("vit", "2d"),
        ("llama", "mixed+sgd"),
        ("gpt2", "2d_ckpt+sgd"),
    ],
    8: [("gpt2", "2.5d+sgd"), ("llama", "3d+sgd"), ("gpt2", "pp2_2d+sgd")],
}
FULL = {
    4: [
        ("gpt2", "2d"),
        ("llama", "2d+sgd"),
        ("bert", "2d+sgd"),
        ("vit", "2d+sgd"),
        ("gpt2", "mixed"),
        ("bert", "mixed"),
    ],
    8: [(m, "2.5d") for m in MODELS]
    + [(m, "2.5d+sgd") for m in ("llama", "bert", "vit")]
    + [(m, "3d") for m in MODELS]
    + [(m, "3d+sgd") for m in ("gpt2", "bert", "vit")]
    + [(m, "pp2_2d") for m in ("llama", "vit")]
    + [("gpt2", "2d_dp2_zero3+sgd"), ("llama", "2d_dp2_zero3")]
    + [("llama", "3d_ckpt+sgd"), ("bert", "3d_ckpt")],
}
_results = shared_runs(
    lambda world_size, fast: (FAST if fast else FULL)[world_size],
    functools.partial(train_cases, make_plan=make_plan),
    timeout_s=1500,
)


@pytest.mark.parametrize("world_size,fast,model,recipe", tier_params(FAST, FULL))
def test_grid_parallel_parity_with_eager(world_size, fast, model, recipe):
    check_parity(model, _results(world_size, fast)[f"{model}/{recipe}"], recipe)


def _dropout_worker(rank: int, world_size: int) -> dict:
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    program, batches = _program("gpt2+dropout")
    plan = make_plan("2d", len(program.body), program.model_name)
    trainer = Trainer(program, plan, config=_config(), optimizer=optimizer_factory("sgd"))
    evaluated = [trainer.evaluate(batch) for batch in batches[:2]]  # dropout off, nothing updated
    return {"evaluated": evaluated, "losses": [float(trainer.step(batch)) for batch in batches]}


def test_a_grid_with_dropout_evaluates_like_the_models_eval_and_trains_with_its_masks():
    import math

    import torch
    from distributed import build

    from galvatron_fx.runtime import spawn

    results = spawn(_dropout_worker, 4, timeout_s=600)
    model, batches = build("gpt2+dropout")
    model.eval()
    with torch.no_grad():
        expected = [float(model(**batch).loss) for batch in batches[:2]]
    for rank in results:
        assert rank["evaluated"] == pytest.approx(expected, abs=1e-5)
        assert rank["losses"] == results[0]["losses"]  # the mean loss of the global batch, on every rank
        assert all(math.isfinite(loss) for loss in rank["losses"])
    assert abs(results[0]["losses"][0] - expected[0]) > 1e-3  # the first step trained with dropout's masks
