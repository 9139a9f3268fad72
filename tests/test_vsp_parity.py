"""Galvatron's vsp: the embedding and the head (LM head and loss) run sequence-parallel over their vtp group,
with whole weights, instead of vocab-parallel. Parity with single-process eager training (fp32, dropout 0,
5 steps, SGD and Adam) for ``uniform_plan(tp=2, vtp=2, vsp=True)`` on GPT-2, LLaMA and BERT on 2 ranks (the fast
tier, one spawn: GPT-2, tied weights and shifted labels, with SGD, and LLaMA with Adam; the full tier: the other
optimizer on each, and BERT), and in the full tier with ZeRO-3 replicas on 4 ranks, with Ulysses layers (whose
layout is the embedding's: no move), and across a pipeline cut (PP2, 4 ranks). The sequence, 12, differs from
every other size (head dim 16); Hugging Face's causal LMs shift the labels inside the loss, which the slices of
the sequence must neither drop nor double.

The full tier adds T5 on 2 ranks (a body layer, the decoder's input, looks up the tied embedding).

One process (no spawn): what lowering refuses (and the search leaves out), the cost model's vsp terms against
what is lowered, and the train command's ``--vsp`` flag."""

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

import galvatron_fx
from galvatron_fx.errors import PlanError

MODELS = ("gpt2", "llama", "bert")
# recipe → (world size, uniform_plan flags)
RECIPES = {
    "vsp2": (2, dict(tp=2, vtp=2, vsp=True)),
    "vsp2_zero3_4": (4, dict(tp=2, vtp=2, vsp=True, sdp=True)),  # two ZeRO-3 replicas of each group
    "vsp2_ulysses_4": (4, dict(tp=2, sp="ulysses", vtp=2, vsp=True)),
    "pp2_vsp2": (4, dict(pp=2, tp=2, vtp=2, vsp=True, chunks=2)),
}
FAST = {2: [("gpt2", "vsp2+sgd"), ("llama", "vsp2")]}
FULL = {
    2: [("gpt2", "vsp2"), ("llama", "vsp2+sgd"), ("bert", "vsp2"), ("bert", "vsp2+sgd"), ("t5", "vsp2+sgd")],
    4: [(m, r) for m in MODELS for r in ("pp2_vsp2", "pp2_vsp2+sgd", "vsp2_zero3_4", "vsp2_ulysses_4")],
}


def make_plan(recipe: str, num_layers: int):
    world, flags = RECIPES[recipe]
    return galvatron_fx.uniform_plan(**flags).resolve(num_layers, world, GLOBAL_BATCH)


def train_cases(rank: int, world_size: int, cases: list[tuple[str, str]]) -> dict:
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    results = {}
    for model_name, recipe in cases:
        base, optimizer = split_recipe(recipe)
        program, batches = _program(model_name)
        plan = make_plan(base, len(program.body))
        trainer = Trainer(
            program, plan, config=_config(), optimizer=optimizer_factory(optimizer), model_name=program.model_name
        )
        losses = [float(trainer.step(batch)) for batch in batches]
        params = trainer.full_parameters()  # collective: every rank takes part
        results[f"{model_name}/{recipe}"] = {
            "losses": losses,
            "params": params if trainer.stage.position.local == 0 else {},
            "describe": _sequence_parallel_ends(trainer.stage),
        }
    return results


def _sequence_parallel_ends(stage) -> str:
    """What the stage's embedding and head were lowered to: the ops that show vsp (or their absence)."""
    from galvatron_fx.passes.lower.stage import unwrap

    found = []
    for layer in stage.stage_layers:
        if layer.kind in ("prologue", "epilogue"):
            code = unwrap(stage.layers[layer.name]).code
            found += [
                f"{layer.kind}:{op}" for op in ("sp_slice", "sequence_cross_entropy", "masked_embedding") if op in code
            ]
    return " ".join(found)


_results = shared_runs(lambda world_size, fast: (FAST if fast else FULL)[world_size], train_cases, timeout_s=1200)


@pytest.mark.parametrize("world_size,fast,model,recipe", tier_params(FAST, FULL))
def test_vsp_parity_with_eager(world_size, fast, model, recipe):
    result = _results(world_size, fast)[f"{model}/{recipe}"]
    check_parity(model, result, recipe)
    ends = " ".join(result["describe"])
    assert "epilogue:sequence_cross_entropy" in ends and "masked_embedding" not in ends, ends  # vsp, not vocab TP


# -- one process ----------------------------------------------------------------------------------------------
def test_vsp_refuses_a_sequence_the_group_cannot_split_and_a_head_without_token_positions():
    from galvatron_fx.passes.lower.obstacles import lowering_obstacles, vsp_obstacle
    from galvatron_fx.passes.lower.pipeline import lower

    warnings.simplefilter("ignore")
    program, _ = _program("gpt2")  # sequence 12: 2 and 4 ranks split it, 8 do not
    plan = galvatron_fx.uniform_plan(vtp=8, vsp=True).resolve(len(program.body), 8, GLOBAL_BATCH)
    with pytest.raises(PlanError, match="sequence length 12 is not divisible by the group size 8") as caught:
        lower(program, plan, 0)
    assert "vsp=False" in caught.value.remedy
    assert vsp_obstacle(program, 4) is None and "not divisible" in vsp_obstacle(program, 8)
    assert set(lowering_obstacles(program, 8).get("embedding", {})) == {"vsp8"}  # the search leaves vsp8 out
    vit, _ = _program("vit")  # an image classifier: no token ids to split
    assert "token ids" in vsp_obstacle(vit, 2)


def test_cost_model_prices_vsp_as_it_is_lowered():
    """vsp: whole weights synchronised over the stage, the data split's compute and memory, and the hidden
    state entering and leaving the body from the layout of a Ulysses layer of degree vtp."""
    from galvatron_fx.cluster import Cluster
    from galvatron_fx.compile import build_cost_model
    from galvatron_fx.parallel_dims import data_split, end_layout
    from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy

    warnings.simplefilter("ignore")
    program, _ = _program("gpt2")
    cost = build_cost_model(program, Cluster.preset("A100-80GB", 1, 2))
    vsp, plain, vocab = EmbeddingStrategy(vtp=2, vsp=True), EmbeddingStrategy(), EmbeddingStrategy(vtp=2)
    a, b, c = (cost.embedding_cost(e, 2, 8, first_stage=True, last_stage=True) for e in (vsp, plain, vocab))
    assert a.model_state_bytes == b.model_state_bytes > c.model_state_bytes  # not split along the vocabulary
    assert (a.activation_bytes, a.peak_extra_bytes, a.grad_sync_s, a.bwd_s) == (
        b.activation_bytes,
        b.peak_extra_bytes,
        b.grad_sync_s,
        b.bwd_s,
    )
    assert 0 < a.fwd_s - b.fwd_s < 1e-3  # ids, labels and two scalars move; no vocab-parallel collective
    layer = LayerStrategy(tp=2, dp=1, sp="megatron")
    entry, exit_ = cost.redistribution_s(data_split(2), layer, 0, 8), cost.redistribution_s(layer, data_split(2), 1, 8)
    assert entry > 0 and exit_ > 0
    assert (
        cost.redistribution_s(end_layout(vsp, 2), layer, 0, 8)
        == cost.redistribution_s(layer, end_layout(vsp, 2), 1, 8)
        == 0
    )
    plans = [
        galvatron_fx.uniform_plan(tp=2, sp="megatron", vtp=vtp, vsp=vtp > 1).resolve(len(program.body), 2, 8)
        for vtp in (2, 1)
    ]
    with_vsp, without = (cost.evaluate(p) for p in plans)
    expected = without.iteration_time_s - entry - cost.redistribution_s(layer, data_split(2), len(program.body), 8)
    assert with_vsp.iteration_time_s == pytest.approx(expected + a.fwd_s - b.fwd_s, rel=1e-12)
    assert with_vsp.memory_bytes_per_stage == without.memory_bytes_per_stage


def test_train_command_takes_galvatrons_vsp_flag():
    import argparse

    from galvatron_fx.training.arguments import add_training_arguments
    from galvatron_fx.training.run import _plan

    args = add_training_arguments(argparse.ArgumentParser()).parse_args(["--tp", "2", "--vtp", "2", "--vsp", "1"])
    plan = _plan(args).resolve(4, 2, GLOBAL_BATCH)
    assert (plan.embedding.vtp, plan.embedding.vsp) == (2, True)
