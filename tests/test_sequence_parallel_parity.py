"""Parity with single-process eager training for sequence parallelism (fp32, dropout 0, Adam, 5 steps):
Megatron-SP on tp 2, Ulysses 2, and plans that mix sequence-parallel layers with plain tensor-parallel and
data-parallel ones (redistribution between sequence and batch layouts, inside a stage and across a cut).

One spawned group per world size runs its cases one after another. The default tier covers GPT-2, LLaMA
(grouped-query attention) and BERT on 2 ranks; ``pytest -m full`` adds 4-rank combinations.
"""

from __future__ import annotations

import functools

import pytest
from distributed import (
    GLOBAL_BATCH,
    check_parity,
    shared_runs,
    tier_params,
    train_cases,
)

from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan

# name → (world size, pp, chunks, vtp, per-layer pattern of (tp, sp, dp_type))
RECIPES = {
    "tp2_sp": (2, 1, 1, 1, ((2, "megatron", "ddp"),)),
    "ulysses2": (2, 1, 1, 1, ((2, "ulysses", "ddp"),)),
    "mixed_sp": (2, 1, 1, 1, ((2, "megatron", "ddp"), (2, "none", "ddp"), (1, "none", "ddp"), (2, "ulysses", "ddp"))),
    "pp2_mixed_sp": (
        4,
        2,
        2,
        1,
        ((2, "megatron", "ddp"), (1, "none", "ddp"), (2, "ulysses", "ddp"), (2, "megatron", "ddp")),
    ),
    "tp2_sp_dp2": (4, 1, 1, 1, ((2, "megatron", "zero3"), (2, "ulysses", "ddp"))),
    "ulysses4": (4, 1, 1, 1, ((4, "ulysses", "ddp"), (4, "megatron", "ddp"))),
    "pp2_sp_cut": (4, 2, 2, 1, ((2, "ulysses", "ddp"), (2, "megatron", "ddp"))),  # the cut carries sequence shards
    # vocab-parallel embedding and head (tests/test_vocab_parallel_parity.py)
    "vtp2": (2, 1, 1, 2, ((1, "none", "ddp"),)),
    "vtp2_tp2_sp": (2, 1, 1, 2, ((2, "megatron", "ddp"), (2, "ulysses", "ddp"))),
    "pp2_vtp2": (4, 2, 2, 2, ((2, "megatron", "ddp"), (1, "none", "zero2"))),
    "vtp4": (4, 1, 1, 4, ((2, "none", "ddp"),)),
}


def make_plan(recipe: str, num_layers: int, model: str = "") -> Plan:
    world, pp, chunks, vtp, pattern = RECIPES[recipe]
    devices = world // pp
    layers = []
    for i in range(num_layers):
        tp, sp, dp_type = pattern[i % len(pattern)]
        layers.append(LayerStrategy(tp=tp, dp=devices // tp, sp=sp, dp_type=dp_type if devices // tp > 1 else "ddp"))
    return Plan(
        world_size=world,
        layers=tuple(layers),
        pp=pp,
        chunks=chunks,
        global_batch=GLOBAL_BATCH,
        embedding=EmbeddingStrategy(vtp=vtp),
        provenance={"model": model} if model else {},
    )


MODELS = ("gpt2", "llama", "bert")
# one 2-rank group also runs the vocab-parallel fast cases (tests/test_vocab_parallel_parity.py): one capture per model
FAST = {
    2: [(m, r) for m in MODELS for r in ("tp2_sp", "ulysses2", "vtp2")]
    + [("llama", "mixed_sp")]
    # SGD's update is proportional to the gradient: a partial sum over the group added up twice, or not at
    # all, shows (Adam's normalised update hides a constant factor)
    + [("bert", "tp2_sp+sgd"), ("llama", "ulysses2+sgd")]
    + [(m, "vtp2+sgd") for m in ("gpt2", "llama", "bert", "t5", "vit", "swin")]
}
FULL = {
    2: [("gpt2", "mixed_sp"), ("bert", "mixed_sp")],
    4: [(m, r) for m in MODELS for r in ("pp2_mixed_sp", "tp2_sp_dp2", "ulysses4", "pp2_sp_cut")],
}
_results = shared_runs(
    lambda world_size, fast: (FAST if fast else FULL)[world_size],
    functools.partial(train_cases, make_plan=make_plan),
    timeout_s=1200,
)


@pytest.mark.parametrize("world_size,fast,model,recipe", tier_params(FAST, FULL))
def test_sequence_parallel_parity_with_eager(world_size, fast, model, recipe):
    check_parity(model, _results(world_size, fast)[f"{model}/{recipe}"], recipe)
