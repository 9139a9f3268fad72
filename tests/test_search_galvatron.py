"""The search on the real cost model: Galvatron's LLaMA-2-7B profiles (1 node × 8 GPUs, 36 GB, bf16, global
batch 16). Galvatron's own strategy file loads and is priced by the same cost model as our plan; our plan is
at least as fast whenever the space holds Galvatron's plan; and the search equals brute force on the real
cost model cut to a few layers."""

import json
from pathlib import Path

import pytest

from galvatron_fx.cli import main
from galvatron_fx.cost.galvatron_import import load_hardware, load_model
from galvatron_fx.cost.model import CostModel
from galvatron_fx.passes.search.brute_force import brute_force_search
from galvatron_fx.passes.search.engine import search
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import Plan

FIXTURE = Path(__file__).parent / "fixtures" / "galvatron-llama2-7b"
GALVATRON_PLAN = FIXTURE / "galvatron_config_llama2-7b_1nodes_8gpus_per_node_36GB_bf16.json"
BUDGET = 36 * 10**9


@pytest.fixture(scope="module")
def cost_model():
    return CostModel(load_model(FIXTURE), load_hardware(FIXTURE, memory_bytes=BUDGET), mixed_precision="bf16")


def test_galvatron_plan_loads_and_ours_is_at_least_as_fast(cost_model):
    theirs = Plan.load(GALVATRON_PLAN, world_size=8)
    their_prediction = cost_model.evaluate(theirs)
    assert max(their_prediction.memory_bytes_per_stage) <= BUDGET
    # a space that holds Galvatron's plan (pp 1, one micro-batch, ZeRO-3 layers, vtp 2 with vsp and ZeRO-3)
    space = SearchSpace(
        global_batch=(16, 16, 1), chunks=(1,), max_pp=1, sp_types=("megatron",), disable_tp_strided=True
    )
    ours = search(cost_model, 8, "36GB", space, provenance={"model": "llama2-7b", "cluster": "1x8"})
    assert ours.prediction == cost_model.evaluate(ours)
    assert max(ours.prediction.memory_bytes_per_stage) <= BUDGET
    assert ours.prediction.samples_per_s >= their_prediction.samples_per_s * (1 - 1e-12)
    assert ours.provenance["memory_budget_bytes"] == BUDGET and ours.provenance["search_time_s"] > 0


def _cut(cost_model, layers: int) -> CostModel:
    """The same cost model over the first ``layers`` body layers (the terms per layer are unchanged)."""
    short = CostModel(cost_model.model, cost_model.hardware, mixed_precision="bf16")
    short.layer_types = cost_model.layer_types[:layers]
    return short


@pytest.mark.parametrize(
    "space",
    [
        SearchSpace(
            global_batch=(8, 8, 1),
            chunks=(2,),
            max_pp=2,
            sp_types=("megatron",),
            dp_types=("zero2", "zero3"),
            disable_tp_strided=True,
            disable_vsp=True,
            disable_embed_sdp=True,
            pipelines=("1f1b",),
        ),
    ],
)
def test_search_equals_brute_force_on_the_real_cost_model(cost_model, space):
    short = _cut(cost_model, 3)
    for budget in (8 * 10**9, 14 * 10**9, 40 * 10**9):
        expected, reference = brute_force_search(short, 8, budget, space)
        plan = search(short, 8, budget, space)
        assert plan.prediction.samples_per_s == pytest.approx(expected, rel=1e-9), (plan, reference)


@pytest.mark.full
def test_search_equals_brute_force_on_the_real_cost_model_wider(cost_model):
    space = SearchSpace(
        global_batch=(8, 16, 8),
        chunks=(1, 2, 4),
        sp_types=("none", "ulysses"),
        dp_types=("ddp", "zero3"),
        disable_tp_strided=True,
        disable_vsp=True,
    )
    short = _cut(cost_model, 2)
    for budget in (6 * 10**9, 20 * 10**9):
        expected, _ = brute_force_search(short, 8, budget, space)
        assert search(short, 8, budget, space).prediction.samples_per_s == pytest.approx(expected, rel=1e-9)


def test_cli_search_with_galvatron_profiles(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(
        [
            "search",
            "--galvatron-profiles",
            str(FIXTURE),
            "--memory",
            "36GB",
            "--batch",
            "16",
            "--chunks",
            "1",
            "--max-pp",
            "1",
            "--sp-types",
            "megatron",
            "--disable-tp-strided",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    plan = Plan.load(out)
    text = capsys.readouterr().out
    assert "samples/s" in text and "stage" in text
    data = json.loads(out.read_text())
    assert data["pp_deg"] == plan.pp and data["galvatron_fx"]["provenance"]["search_time_s"] > 0


def test_cli_infeasible_budget_reports_smallest(tmp_path, capsys):
    code = main(
        [
            "search",
            "--galvatron-profiles",
            str(FIXTURE),
            "--memory",
            "2GB",
            "--batch",
            "16",
            "--chunks",
            "2",
            "--max-pp",
            "1",
            "--sp-types",
            "megatron",
            "--disable-tp-strided",
            "--out",
            str(tmp_path / "p.json"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "smallest budget that fits" in err
