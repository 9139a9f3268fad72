"""Parity with single-process eager training (fp32, dropout 0, Adam, 5 steps): every acceptance plan on
every model trains to the same losses (≤ 1e-4 per step, on every rank) and the same final parameters
(≤ 1e-4, each stage's copy of a tied weight included).

One spawned group per world size runs all of its cases sequentially. The default tier runs every plan on
GPT-2 and T5 (tied weights on three stages, PP cut between encoder and decoder) and the pipeline and
heterogeneous plans on the other models; ``pytest -m full`` runs every plan on every model.
"""

import pytest
from distributed import MODELS, RECIPES, check_parity, shared_runs

PARITY_PLANS = [name for name in RECIPES if not name.startswith("drop_")]
FAST_MODELS = ("gpt2", "t5")
FAST_PLANS_OTHERS = ("pp2_1f1b", "hetero4")
SGD_PLANS = ("dp2", "pp2_1f1b", "zero3_4")


def _cases(world_size: int, fast: bool) -> list[tuple[str, str]]:
    cases = []
    for model in MODELS:
        for plan in PARITY_PLANS:
            if RECIPES[plan].world_size != world_size:
                continue
            in_fast = model in FAST_MODELS or plan in FAST_PLANS_OTHERS
            if in_fast == fast:
                cases.append((model, plan))
    if fast and world_size == 2:
        cases += [("gpt2+dropout", "drop_pp2_first1"), ("gpt2+dropout", "drop_pp2_last1_ckpt")]
    if fast:  # SGD on every model: data parallelism over ranks and micro-batches, pipelines, ZeRO-3
        cases += [
            (model, f"{plan}+sgd") for model in MODELS for plan in SGD_PLANS if RECIPES[plan].world_size == world_size
        ]
    return cases


_results = shared_runs(_cases)


def _params(fast: bool):
    marks = () if fast else (pytest.mark.full,)
    return [
        pytest.param(w, m, p, id=f"{m}-{p}", marks=marks)
        for w in (2, 4)
        for m, p in _cases(w, fast)
        if not p.startswith("drop_")
    ]


@pytest.mark.parametrize("world_size,model,plan", _params(fast=True) + _params(fast=False))
def test_parity_with_eager(world_size, model, plan):
    fast = (model, plan) in _cases(world_size, True)
    check_parity(model, _results(world_size, fast)[f"{model}/{plan}"], plan)


def test_dropout_does_not_depend_on_stage_division_or_checkpointing():
    results = _results(2, True)
    first = results["gpt2+dropout/drop_pp2_first1"]["losses"]
    second = results["gpt2+dropout/drop_pp2_last1_ckpt"]["losses"]
    for a, b in zip(first[0], second[0]):
        assert abs(a - b) <= 1e-5, (first[0], second[0])
    undropped = results["gpt2/pp2_1f1b"]["losses"][0]
    assert max(abs(a - b) for a, b in zip(first[0], undropped)) > 1e-3, "dropout had no effect"


def test_stages_report_their_strategies():
    described = _results(4, True)["gpt2/hetero4"]["describe"]
    assert len(described) == 4
    assert "stage 0/2" in described[0] and "stage 1/2" in described[2]
    assert "dp2-zero3 ckpt" in "\n".join(described) and "CheckpointedLayer" in "\n".join(described)
    assert "tied: ['lm_head.weight']" in described[0]
