"""The search is exact on its own cost model: equal to brute force over every plan (toy cost model that
follows the cost contract, with random but deterministic terms), restricted spaces are honoured, and bad
inputs give errors that name the way out."""

import dataclasses
import json

import numpy as np
import pytest
from toy_cost_model import ToyCostModel

import galvatron_fx
from galvatron_fx.errors import ConfigError, PlanError
from galvatron_fx.passes.search.bounds import division_bound_s
from galvatron_fx.passes.search.brute_force import all_plans, brute_force_search
from galvatron_fx.passes.search.engine import SearchEngine, search
from galvatron_fx.passes.search.front import pareto_indices
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import LayerStrategy as S
from galvatron_fx.plan import Plan


def _budget_between(model, world, space, quantile):
    """A budget at a quantile of all plans' peak stage memory (so that some, not all, plans fit)."""
    mems = sorted(max(model.evaluate(p).memory_bytes_per_stage) for p in all_plans(model, world, space))
    return mems[int(quantile * (len(mems) - 1))]


def _space(**fields) -> SearchSpace:
    base = dict(
        global_batch=(4, 4, 1), sp_types=("none",), dp_types=("ddp", "zero3"), disable_tp_strided=True, disable_vsp=True
    )
    return SearchSpace(**{**base, **fields})


# each case stays below ~30k plans so that brute force takes seconds
@pytest.mark.parametrize(
    "types,world,seed,quantile,space",
    [
        (["a", "a", "a"], 4, 0, 0.3, _space(chunks=(1, 2))),
        (
            ["a", "b", "a"],
            4,
            1,
            0.5,
            _space(global_batch=(2, 4, 2), chunks=(1, 2), dp_types=("zero2",), sp_types=("megatron",)),
        ),
        (["a", "a", "b", "b", "a"], 2, 2, 0.2, _space(dp_types=("zero3",), disable_embed_sdp=True, chunks=(2, 4))),
        (
            ["a", "b", "c", "a", "b", "c"],
            2,
            3,
            0.6,
            _space(global_batch=(2, 2, 1), sp_types=("ulysses",), dp_types=("ddp",), disable_embed_sdp=True),
        ),
        (
            ["a", "a"],
            8,
            4,
            0.4,
            _space(global_batch=(8, 8, 1), chunks=(2,), sp_types=("none", "megatron"), disable_tp_strided=False),
        ),
        (
            ["a", "b", "a", "b"],
            4,
            5,
            0.5,
            _space(global_batch=(4, 4, 1), chunks=(2,), pipelines=("1f1b",), disable_vtp=True),
        ),
        # one stage (folded fronts) with several micro-batch counts, redistribution between layouts, ZeRO-3 peaks
        (["a", "b", "a", "b"], 2, 12, 0.35, _space(chunks=(1, 2, 4), sp_types=("megatron",), max_pp=1)),
        (
            ["a", "a", "a", "a"],
            2,
            13,
            0.5,
            _space(chunks=(2,), sp_types=("none", "ulysses"), dp_types=("zero2", "zero3")),
        ),
        (
            ["a", "b", "b", "a"],
            4,
            14,
            0.25,
            _space(global_batch=(16, 16, 1), chunks=(2, 4), max_pp=1, max_tp=2, pipelines=("gpipe",)),
        ),
        (
            ["b", "a", "a"],
            4,
            15,
            0.65,
            _space(global_batch=(4, 8, 4), chunks=(2, 4), disable_vsp=False, sp_types=("megatron",), max_tp=2),
        ),
        # grid tensor parallelism: 2D on 4 devices, 2.5D and 3D on 8, per layer beside 1D; and grids only
        (["a", "b"], 8, 16, 0.4, _space(global_batch=(8, 8, 1), chunks=(1, 2), dp_types=("ddp",))),
        (["a", "b", "a"], 8, 17, 0.5, _space(global_batch=(16, 16, 1), chunks=(2,), tp_modes=("2d", "2.5d", "3d"))),
    ],
)
def test_search_equals_brute_force(types, world, seed, quantile, space):
    model = ToyCostModel(types, seed=seed, heads={"b": 2})
    budget = _budget_between(model, world, space, quantile)
    expected, reference = brute_force_search(model, world, budget, space)
    plan = search(model, world, budget, space)
    assert expected > 0
    assert plan.prediction.samples_per_s == pytest.approx(expected, rel=1e-9), (plan, reference)
    assert max(plan.prediction.memory_bytes_per_stage) <= budget
    assert plan.prediction == model.evaluate(plan)
    if seed in (16, 17):  # the grid cases: their plans hold every mode
        modes = {(s.tp_mode, s.tp_depth) for p in all_plans(model, world, space) for s in p.layers}
        assert {("2d", 1), ("2.5d", 2), ("3d", 1)} <= modes


def test_grid_modes_are_per_layer_choices_of_the_space():
    full = SearchSpace().layer_strategies(64)
    grids = {(s.tp, s.tp_mode, s.tp_depth) for s in full if s.tp_mode != "1d"}
    assert grids == {
        (4, "2d", 1),
        (16, "2d", 1),
        (64, "2d", 1),
        (8, "2.5d", 2),
        (16, "2.5d", 4),
        (32, "2.5d", 2),
        (32, "2.5d", 8),
        (64, "2.5d", 4),
        (64, "2.5d", 16),
        (8, "3d", 1),
        (64, "3d", 1),
    }
    assert all(s.sp == "none" and s.tp_consecutive for s in full if s.tp_mode != "1d")
    assert len(full) == len(set(full))
    assert all(s.tp_mode == "1d" for s in SearchSpace(tp_modes=("1d",)).layer_strategies(64))
    # without consecutive groups a grid remains only where tp is the whole stage (no other order)
    assert all(s.tp_mode == "1d" or s.tp == 64 for s in SearchSpace(disable_tp_consec=True).layer_strategies(64))
    only = SearchSpace(tp_modes=("2d",)).layer_strategies(16)
    assert {s.tp for s in only} == {1, 4, 16} and all(s.tp_mode == "2d" for s in only if s.tp > 1)
    with pytest.raises(ConfigError, match="tp_modes"):
        SearchSpace(tp_modes=("4d",))


def test_tp_modes_on_the_command_line():
    from galvatron_fx.cli import build_parser
    from galvatron_fx.commands.search import _space, _tp_modes

    args = build_parser().parse_args(["search", "gpt2"])
    assert _space(args).tp_modes == ("1d", "2d", "2.5d", "3d")
    assert _tp_modes(" 1d, 2.5d ") == ("1d", "2.5d")
    with pytest.raises(ConfigError) as error:
        _tp_modes("1d,4d")
    assert "4d" in error.value.cause and "1d, 2d, 2.5d, 3d" in error.value.remedy


def test_budget_exactly_at_a_plans_memory_is_feasible():
    model = ToyCostModel(["a", "a", "a"], seed=7)
    space = SearchSpace(global_batch=(4, 4, 1), sp_types=("none",))
    budget = _budget_between(model, 4, space, 0.0)  # only the least-memory plans fit, with no slack
    expected, _ = brute_force_search(model, 4, budget, space)
    assert expected > 0
    assert search(model, 4, budget, space).prediction.samples_per_s == pytest.approx(expected, rel=1e-9)


def test_grad_sync_every_micro_batch_and_gpipe_only():
    model = ToyCostModel(["a", "b", "a"], seed=5)
    space = SearchSpace(
        global_batch=(8, 8, 1), pipelines=("gpipe",), grad_sync_every_micro_batch=True, sp_types=("none",)
    )
    budget = _budget_between(model, 4, space, 0.5)
    expected, _ = brute_force_search(model, 4, budget, space)
    plan = search(model, 4, budget, space)
    assert plan.pipeline == "gpipe" and plan.grad_sync_every_micro_batch
    assert plan.prediction.samples_per_s == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["3d", "dp+tp", "dp+pp", "dp", "sdp", "tp", "pp"])
def test_restricted_spaces_are_honoured_and_exact(name):
    model = ToyCostModel(["a", "b", "a"], seed=11)
    space = SearchSpace.named(
        name,
        global_batch=(8, 8, 1),
        chunks=(1, 2),
        sp_types=("megatron",),
        dp_types=("ddp", "zero3"),
        disable_tp_strided=True,
        disable_vsp=True,
    )
    budget = _budget_between(model, 8, space, 0.7)
    expected, _ = brute_force_search(model, 8, budget, space)
    plan = search(model, 8, budget, space)
    assert plan.prediction.samples_per_s == pytest.approx(expected, rel=1e-9)
    strategies = set(plan.layers)
    if space.uniform:
        assert len(strategies) == 1
    if name in ("dp+tp", "dp", "sdp", "tp"):
        assert plan.pp == 1
    if name in ("dp+pp", "dp", "sdp", "pp"):
        assert all(s.tp == 1 for s in strategies)
    if name == "pp":
        assert plan.pp == 2  # the largest pp that 3 layers allow on 8 devices
    if name == "tp":
        assert all(s.tp == 8 for s in strategies)
    if name == "sdp":
        assert all(s.dp_type == "zero3" for s in strategies)
    if name != "sdp":
        assert all(s.dp_type != "zero3" for s in strategies)
    if name in ("3d", "dp", "sdp", "tp", "pp"):
        assert not any(s.ckpt for s in strategies)


def test_switches_and_maximum_degrees():
    model = ToyCostModel(["a"] * 4, seed=2)
    space = SearchSpace(
        global_batch=(8, 8, 1),
        chunks=(2,),
        max_tp=2,
        max_pp=2,
        disable_ckpt=True,
        disable_vtp=True,
        pipelines=("1f1b",),
        dp_types=("zero2",),
        sp_types=("megatron",),
        disable_tp_strided=True,
    )
    plan = search(model, 8, 10**12, space)
    assert plan.chunks == 2 and plan.pp <= 2 and plan.pipeline == "1f1b" and plan.embedding.vtp == 1
    for s in plan.layers:
        assert s.tp <= 2 and not s.ckpt and s.tp_consecutive and (s.dp == 1 or s.dp_type == "zero2")
        assert s.sp == ("megatron" if s.tp > 1 else "none")


def test_heads_not_divisible_leave_strategies_out_with_reason():
    model = ToyCostModel(["a", "a"], seed=3, heads={"a": 6})
    plan = search(model, 8, 10**12, SearchSpace(global_batch=(8, 8, 1)))
    assert all(s.tp in (1, 2) for s in plan.layers)
    assert any("tp 4 does not divide 6 heads" in reason for reason in plan.provenance["left_out"])


def test_infeasible_budget_names_smallest_budget_and_plan():
    model = ToyCostModel(["a", "b", "a"], seed=9)
    space = SearchSpace(global_batch=(4, 4, 1), sp_types=("none",))
    least = _budget_between(model, 4, space, 0.0)
    with pytest.raises(PlanError) as error:
        search(model, 4, least - 1, space)
    assert f"({least} bytes)" in str(error.value) and "pp=" in str(error.value)
    assert search(model, 4, least, space).prediction is not None


def test_world_size_no_plan_can_use():
    model = ToyCostModel(["a", "a"], seed=1)
    with pytest.raises(PlanError, match="micro-batch 4 does not give each of the 3 devices of a stage its own samples"):
        search(model, 3, 10**12, SearchSpace(global_batch=(4, 4, 1)))


@pytest.mark.parametrize(
    "types,world,seed,quantile,space",
    [
        (["a", "a", "a"], 4, 0, 0.3, _space(chunks=(1, 2))),
        (["a", "a", "b", "b", "a"], 2, 2, 0.2, _space(dp_types=("zero3",), disable_embed_sdp=True, chunks=(2, 4))),
        (
            ["b", "a", "a"],
            4,
            15,
            0.65,
            _space(global_batch=(4, 8, 4), chunks=(2, 4), disable_vsp=False, sp_types=("megatron",), max_tp=2),
        ),
    ],
)
def test_stage_bound_never_exceeds_a_fitting_plans_time(types, world, seed, quantile, space):
    """The exact pass skips a setting on its per-stage bound: no plan of the setting that fits may be faster
    (checked against every plan), and it is never looser than the pooled bound that orders the settings."""
    model = ToyCostModel(types, seed=seed, heads={"b": 2})
    budget = _budget_between(model, world, space, quantile)
    engine = SearchEngine(model, world, budget, space, None)
    plans = [(plan, model.evaluate(plan)) for plan in all_plans(model, world, space)]
    checked = 0
    for setting in engine.settings():
        pp, c = setting.pp, setting.chunks
        layers = set(space.layer_strategies(setting.devices, setting.dp_mode))
        embeddings = set(space.embedding_strategies(setting.devices, setting.dp_mode))
        bound_s = engine.stage_time_lower_bound(setting)
        assert setting.global_batch / bound_s <= setting.upper_bound * (
            1 + 1e-6
        )  # both keep a relative slack against rounding
        for plan, prediction in plans:
            if (
                (plan.pp, plan.global_batch, plan.chunks) == (pp, setting.global_batch, c)
                and set(plan.layers) <= layers
                and plan.embedding in embeddings
                and prediction.budgeted_bytes <= budget
                and tuple(model.in_flight(plan.pipeline, pp, s, c) for s in range(pp)) == setting.in_flight
            ):
                assert bound_s <= prediction.iteration_time_s * (1 + 1e-9), plan
                checked += 1
    assert checked > 0


def test_division_bound_takes_the_least_sum_and_the_least_slowest_stage():
    inf = np.inf
    # 3 layers, 2 stages: [a, b] → seconds of a stage over layers [a, b)
    first = np.array([[inf, 1, 5, 9], [inf] * 4, [inf] * 4, [inf] * 4])
    second = np.array([[inf] * 4, [inf, inf, 4, 6], [inf, inf, inf, 3], [inf] * 4])
    # divisions: [0,1)+[1,3) = 1 + 6 (slowest 6), [0,2)+[2,3) = 5 + 3 (slowest 5)
    assert division_bound_s([first, second], chunks=1) == 7
    assert division_bound_s([first, second], chunks=4) == 7 + 3 * 5
    assert division_bound_s([first], chunks=1) == 9


def test_pareto_indices_matches_definition():
    rng = np.random.default_rng(0)
    for n in (1, 5, 300, 700):
        pts = rng.integers(0, 12, size=(n, 3)).astype(float)
        keep = set(pareto_indices(pts[:, 0], pts[:, 1], pts[:, 2]).tolist())
        for i in range(n):
            dominated = any((pts[j] <= pts[i]).all() and (pts[j] < pts[i]).any() for j in range(n))
            assert (i in keep) != dominated or (not dominated and any((pts[j] == pts[i]).all() for j in keep))
        assert len({tuple(pts[i]) for i in keep}) == len(keep)  # one of equal points
    for n in (9, 600, 2000):  # groups: only points of the same group dominate each other
        pts = rng.integers(0, 15, size=(n, 3)).astype(float)
        grp = rng.integers(0, 3, size=n)
        keep = set(pareto_indices(pts[:, 0], pts[:, 1], pts[:, 2], grp).tolist())
        for k in range(3):
            members = np.flatnonzero(grp == k)
            front = {
                tuple(pts[i])
                for i in members
                if not any((pts[j] <= pts[i]).all() and (pts[j] < pts[i]).any() for j in members)
            }
            assert {tuple(pts[i]) for i in keep if grp[i] == k} == front
            assert sum(grp[i] == k for i in keep) == len(front)


def test_plan_json_round_trip(tmp_path):
    model = ToyCostModel(["a", "b", "a", "b"], seed=4)
    plan = search(model, 8, 10**12, SearchSpace(global_batch=(8, 16, 8)), provenance={"model": "toy", "cluster": "1x8"})
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and again.prediction == plan.prediction
    assert again.provenance["model"] == "toy" and again.provenance["search_time_s"] >= 0
    assert model.evaluate(again) == plan.prediction
    # the search's budget figure travels with the prediction; files written before it load without one
    bounded = dataclasses.replace(
        plan, prediction=dataclasses.replace(plan.prediction, memory_bound_bytes_per_stage=(7,) * plan.pp)
    )
    bounded.save(tmp_path / "bounded.json")
    assert Plan.load(tmp_path / "bounded.json").prediction.budgeted_bytes == 7
    data = json.loads((tmp_path / "bounded.json").read_text())
    del data["galvatron_fx"]["prediction"]["memory_bound_bytes_per_stage"]
    (tmp_path / "older.json").write_text(json.dumps(data))
    older = Plan.load(tmp_path / "older.json").prediction
    assert older.memory_bound_bytes_per_stage == () and older.budgeted_bytes == max(
        plan.prediction.memory_bytes_per_stage
    )


def test_pipeline_time_with_one_chunk_skips_unreachable_sync_levels():
    from galvatron_fx.passes.search.stage_solver import pipeline_time

    # stage 1's smallest sync (2.0) is above stage 0's (1.0): γ = 1.0 is unreachable for it, γ = 2.0 is the answer
    fronts = [(np.array([1.0, 3.0]), np.array([2.0, 1.0])), (np.array([5.0]), np.array([2.0]))]
    time_s, picks = pipeline_time(fronts, chunks=1)
    assert time_s == 1.0 + 5.0 + 2.0 and picks == [0, 0]


def test_the_real_and_the_toy_cost_models_both_follow_the_cost_contract():
    from galvatron_fx.cluster import Cluster
    from galvatron_fx.compile import build_cost_model
    from galvatron_fx.models import build_model
    from galvatron_fx.passes.search.cost_contract import CostContract

    model, batch = build_model("gpt2", batch=4, seq=12)
    real = build_cost_model(galvatron_fx.capture(model, example_kwargs=batch), Cluster.preset("A100-80GB", 1, 2))
    assert isinstance(real, CostContract) and isinstance(ToyCostModel(["a"]), CostContract)
    assert not isinstance(object(), CostContract)


def test_the_search_syncs_every_micro_batch_where_deferring_does_not_fit():
    """ZeRO-3 with 4 micro-batches: deferring the gradient sync saves three reduce-scatters but holds each
    layer's unsharded gradient; the search defers where that fits and syncs every micro-batch where not."""
    from cost_fixtures import synthetic_profile, uniform_hardware

    from galvatron_fx.cost.model import CostModel

    model = CostModel(synthetic_profile(), uniform_hardware(world=2))
    space = SearchSpace(
        global_batch=(8, 8, 1),
        chunks=(4,),
        dp_types=("zero3",),
        disable_dp=True,
        disable_tp=True,
        disable_pp=True,
        disable_ckpt=True,
        disable_vtp=True,
        pipelines=("1f1b",),
    )
    layers = (S(dp=2, dp_type="zero3"),) * 4
    by_sync = {
        every: model.evaluate(
            Plan(world_size=2, layers=layers, chunks=4, global_batch=8, grad_sync_every_micro_batch=every)
        )
        for every in (False, True)
    }
    deferred, every = by_sync[False], by_sync[True]
    assert deferred.budgeted_bytes > every.budgeted_bytes and deferred.iteration_time_s < every.iteration_time_s
    roomy = search(model, 2, deferred.budgeted_bytes, space)
    assert not roomy.grad_sync_every_micro_batch and roomy.layers == layers
    tight = search(model, 2, (deferred.budgeted_bytes + every.budgeted_bytes) // 2, space)
    assert tight.grad_sync_every_micro_batch and tight.layers == layers
    fixed = dataclasses.replace(space, grad_sync_every_micro_batch=False)
    with pytest.raises(PlanError):
        search(model, 2, (deferred.budgeted_bytes + every.budgeted_bytes) // 2, fixed)
