"""Parity with single-process eager training for plans that cut inside layers (fp32, dropout 0, Adam,
5 steps): tensor parallelism on consecutive and strided groups, with data parallelism, ZeRO-3, pipelines,
and a plan whose layers alternate tp 1/2/4 (redistribution between them).

One spawned group per world size runs its cases one after another (each rank captures a model once per
batch size). The default tier runs GPT-2 and LLaMA (grouped-query attention); ``pytest -m full`` the rest.
"""

from __future__ import annotations

import warnings

import pytest
from distributed import (
    GLOBAL_BATCH,
    _config,
    _program,
    check_parity,
    optimizer_factory,
    shared_runs,
    split_recipe,
    tier_params,
)

from galvatron_fx.plan import LayerStrategy, Plan

# name → (world size, pp, chunks, per-layer pattern of (tp, dp_type, consecutive))
RECIPES = {
    "tp2": (2, 1, 1, ((2, "ddp", True),)),
    "tp4": (4, 1, 1, ((4, "ddp", True),)),
    "tp2_strided": (4, 1, 1, ((2, "ddp", False),)),
    "tp2_dp2": (4, 1, 1, ((2, "ddp", True),)),
    "tp2_zero3": (4, 1, 1, ((2, "zero3", True),)),
    "pp2_tp2": (4, 2, 2, ((2, "ddp", True),)),
    "hetero_tp": (4, 1, 1, ((1, "ddp", True), (2, "zero3", True), (4, "ddp", True), (2, "ddp", False))),
}


def make_plan(recipe: str, num_layers: int, model: str = "") -> Plan:
    world, pp, chunks, pattern = RECIPES[recipe]
    devices = world // pp
    layers = []
    for i in range(num_layers):
        tp, dp_type, consecutive = pattern[i % len(pattern)]
        layers.append(
            LayerStrategy(
                tp=tp, dp=devices // tp, dp_type=dp_type if devices // tp > 1 else "ddp", tp_consecutive=consecutive
            )
        )
    return Plan(
        world_size=world,
        layers=tuple(layers),
        pp=pp,
        chunks=chunks,
        global_batch=GLOBAL_BATCH,
        provenance={"model": model} if model else {},
    )


def train_cases(rank: int, world_size: int, cases: list[tuple[str, str]]) -> dict:
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    results = {}
    for model_name, recipe in cases:
        base, optimizer = split_recipe(recipe)
        program, batches = _program(model_name)
        plan = make_plan(base, len(program.body), program.model_name)
        trainer = Trainer(
            program, plan, config=_config(), optimizer=optimizer_factory(optimizer), model_name=program.model_name
        )
        losses = [float(trainer.step(batch)) for batch in batches]
        params = trainer.full_parameters()
        results[f"{model_name}/{recipe}"] = {
            "losses": losses,
            "params": params,
            "local": trainer.stage.position.local,
            "tp_records": {},
        }
    return results


ALL_MODELS = ("gpt2", "llama", "bert", "t5", "vit", "swin")
FAST = {
    2: [("gpt2", "tp2"), ("llama", "tp2")] + [(m, "tp2+sgd") for m in ALL_MODELS],
    4: [
        ("gpt2", "tp4"),
        ("llama", "tp4"),
        ("bert", "tp2_strided"),
        ("gpt2", "tp2_dp2"),
        ("llama", "tp2_zero3"),
        ("gpt2", "pp2_tp2"),
        ("llama", "hetero_tp"),
    ]
    + [(m, "pp2_tp2+sgd") for m in ALL_MODELS],
}
FULL = {
    2: [("bert", "tp2"), ("t5", "tp2"), ("vit", "tp2"), ("swin", "tp2")],
    4: [(m, r) for m in ("gpt2", "llama", "bert") for r in RECIPES if RECIPES[r][0] == 4 and (m, r) not in FAST[4]]
    + [(m, "pp2_tp2") for m in ("t5", "vit", "swin")],
}
_results = shared_runs(lambda world_size, fast: (FAST if fast else FULL)[world_size], train_cases, timeout_s=1200)


@pytest.mark.parametrize("world_size,fast,model,recipe", tier_params(FAST, FULL))
def test_tensor_parallel_parity_with_eager(world_size, fast, model, recipe):
    result = _results(world_size, fast)[f"{model}/{recipe}"]
    # sharded parameters come back whole (full_parameters), from every rank
    check_parity(model, result, recipe)
