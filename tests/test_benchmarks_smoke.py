"""The benchmarks' code paths on a tiny model: the memory meter, the statistics, the plan grids and the
search used by plan quality in this process, and one spawned group of 2 ranks running the measuring
workers of the three benchmarks (our plans with the memory meter; ours against native DDP and 1F1B).
No timing is asserted: figures live in benchmarks/results, not in tests."""

from __future__ import annotations

import math
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, cost_accuracy, measure_plans, plan_quality, runtime_overhead  # noqa: E402
from galvatron_fx.plan import LayerStrategy, Plan  # noqa: E402

MiB = 2**20


def test_peak_step_bytes_counts_live_tensors_at_their_peak():
    state = [torch.zeros(MiB // 4)]  # 1 MiB live before the step

    def step():
        a = torch.empty(MiB // 4)
        del a
        b = torch.ones(MiB // 2)  # 2 MiB
        c = b * 2  # and 2 more: the peak is 4 MiB above the state
        return float(c.sum())

    peak = common.peak_step_bytes(step, torch.device("cpu"), lambda: state)
    assert 5 * MiB <= peak < 5 * MiB + 1024  # the scalar sum adds a few bytes


def test_peak_step_bytes_ignores_what_an_earlier_measurement_left_in_the_count():
    kept = []

    def step_keeping_8_mib():  # its 8 MiB outlive the measurement and are freed after it
        kept.append(torch.ones(2 * MiB))

    def step():
        return float(torch.ones(MiB // 2).sum())  # 2 MiB at its peak

    common.peak_step_bytes(step_keeping_8_mib, torch.device("cpu"), lambda: [])
    kept.clear()
    peak = common.peak_step_bytes(step, torch.device("cpu"), lambda: [])
    assert 2 * MiB <= peak < 2 * MiB + 1024


def test_peak_step_bytes_counts_frees_on_other_threads():
    # gloo's worker threads free the copies a collective makes: a free there must lower the count too
    held = []

    def step():
        held.append(torch.ones(2 * MiB))  # 8 MiB, freed by another thread
        worker = threading.Thread(target=held.clear)
        worker.start()
        worker.join()
        return float(torch.ones(MiB // 4).sum())  # 1 MiB after it

    peak = common.peak_step_bytes(step, torch.device("cpu"), lambda: [])
    assert 8 * MiB <= peak < 8 * MiB + 1024


def test_tensor_bytes_counts_shared_storage_once():
    x = torch.zeros(1024)
    assert common.tensor_bytes([x, x[:10], x.view(32, 32), None]) == 4096


def test_spearman_and_summary():
    assert common.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert common.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    rows = [
        {"time_error": e, "memory_errors_per_rank": [m], "predicted_s": p, "measured_s": q}
        for e, m, p, q in ((0.1, -0.05, 1, 1.1), (-0.3, 0.2, 2, 1.5), (0.05, 0.0, 3, 3.2))
    ]
    summary = cost_accuracy.summarise(rows)
    assert summary["median_time_error"] == pytest.approx(0.1) and summary["worst_time_error"] == pytest.approx(0.3)
    assert summary["worst_memory_error"] == pytest.approx(0.2) and summary["spearman_time"] == pytest.approx(1.0)


def test_cost_accuracy_plans_cover_the_strategies():
    plans = [p for w in (2, 4) for _, p in cost_accuracy.plans(w, 4, "gpt2")]
    strategies = [s for p in plans for s in p.layers]
    assert len(plans) >= 15
    assert {p.pp for p in plans} >= {1, 2, 4} and {s.tp for s in strategies} >= {1, 2, 4}
    assert {s.dp_type for s in strategies if s.dp > 1} == {"ddp", "zero2", "zero3"}
    assert any(s.ckpt for s in strategies) and any(not s.tp_consecutive for s in strategies)
    assert any(len(set(p.layers)) > 1 for p in plans) and any(len(set(p.pp_division)) > 1 for p in plans)


def test_out_of_sample_plans_cover_every_kind_at_both_world_sizes():
    from benchmarks.cost_accuracy_oos import plans

    for world in (2, 4):
        cases = plans(4, world)
        names = [name for name, _, _ in cases]
        assert len(names) == len(set(names)), names
        assert {kind for _, kind, _ in cases} == {"DP", "ZeRO-2", "ZeRO-3", "TP", "TP+SP", "PP", "mixed"}
        for _, _, plan in cases:
            assert plan.world_size == world and all(s.tp * s.dp * plan.pp == world for s in plan.layers)
    # the 4-process names are those of the stored results (--predict-only finds their measurements by name)
    assert {"dp4", "tp2-dp2", "tp4-sp", "pp4-gpipe-c4", "pp2-mixed-c2"} <= {name for name, _, _ in plans(4)}


def test_paired_ratio_compares_each_round_within_itself():
    # the machine slows down between the two sides of round 2: pooled medians read 1.5, the rounds 1.0
    ours = [[100, 100, 100, 100, 150, 150, 150, 150, 150, 150], [90] * 10]  # rank 0 is the slowest
    native = [[100, 100, 100, 100, 100, 100, 150, 150, 150, 150], [80] * 10]
    assert runtime_overhead.paired_ratio(ours, native, steps=2) == pytest.approx(1.0)
    assert common.median(ours[0]) / common.median(native[0]) == pytest.approx(1.5)
    slower = [[t * 1.04 for t in ours[0]], ours[1]]
    assert runtime_overhead.paired_ratio(slower, native, steps=2) == pytest.approx(1.04)


def test_measuring_in_rounds_alternates_the_order_and_pools_step_times(monkeypatch):
    launched = []

    def fake_spawn(fn, world, model, shape, cases, warmup, repeats, batch, measure_memory):
        ((name, _),) = cases
        launched.append((world, name, measure_memory))
        return [
            [
                {
                    "plan": name,
                    "rank": rank,
                    "stage": 0,
                    "times_s": [len(launched) + rank / 10],
                    "peak_bytes": 1 if measure_memory else None,
                }
            ]
            for rank in range(world)
        ]

    monkeypatch.setattr(measure_plans, "spawn", fake_spawn)
    by_world = {w: cost_accuracy.plans(w, 4, "gpt2")[:2] for w in (2, 4)}
    measured = measure_plans.measure_in_rounds("gpt2", "tiny", by_world, 1, 1, rounds=3)
    first = [(w, name) for w, cases in by_world.items() for name, _ in cases]
    assert [(w, n) for w, n, _ in launched] == first + first[::-1] + first  # every other round reversed
    assert [m for *_, m in launched] == [True] * 4 + [False] * 8  # memory in the first round only
    dp4 = measured[4][3][0]  # rank 3's first plan
    assert dp4["plan"] == "dp4" and dp4["times_s"] == [3.3, 6.3, 11.3] and dp4["peak_bytes"] == 1


def test_uniform_grid_and_search_keep_two_samples_per_rank():
    from galvatron_fx.cluster import Cluster
    from galvatron_fx.cost.model import CostModel
    from galvatron_fx.cost.model_profile import ModelProfile
    from galvatron_fx.passes.lower.stage import local_micro_batch

    grid = plan_quality.uniform_grid(4, 2, 8)
    names = [n for n, _ in grid]
    assert len(names) == len(set(names)) and all(local_micro_batch(p) >= 2 for _, p in grid)
    assert {(p.pp, p.layers[0].tp) for _, p in grid} == {(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, batch = common.build_model("llama", "tiny", 2)
        from galvatron_fx import capture

        profile = ModelProfile.from_program(capture(model, example_kwargs=batch), flops_per_s=1e10)
    cost = CostModel(profile, Cluster.detect({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}).hardware_profile())
    searched = plan_quality.searched_plan(cost, 4, 2, 8, "4GiB")
    assert local_micro_batch(searched) >= 2 and all(s.sp == "none" for s in searched.layers)
    best_uniform = max(cost.evaluate(p).samples_per_s for _, p in grid)
    assert searched.prediction.samples_per_s >= best_uniform * (1 - 1e-9)  # the search covers the grid


def _workers(rank: int, world: int) -> dict:
    hetero = Plan(
        world_size=2, layers=(LayerStrategy(dp=2, dp_type="zero3", ckpt=True), LayerStrategy(tp=2)), global_batch=8
    )
    ours = measure_plans.run_plans(rank, world, "gpt2", "tiny", [("hetero", hetero)], 1, 1)
    compared = runtime_overhead.compare(rank, world, "tiny", ["ddp", "pp"], 2, 1, 1, 1)
    ddp = Plan(world_size=2, layers=(LayerStrategy(dp=2),) * 2, global_batch=8)
    side = plan_quality.side_by_side(rank, world, "tiny", [("searched", hetero), ("best", ddp)], "ddp", 8, 1, 1, 2, 4)
    return {
        "ours": ours,
        "side": {name: len(times) for name, times in side.items()},
        "compared": {
            k: {"first_loss": v["first_loss"], "counts": {n: len(t) for n, t in v["times_s"].items()}}
            for k, v in compared.items()
        },
    }


def test_measuring_workers_on_two_ranks():
    results = common.spawn(_workers, 2, timeout_s=300)
    for rank, result in enumerate(results):
        assert result["side"] == {"searched": 2, "best": 2, "native ddp": 2}  # one step per round, alternated
        (row,) = result["ours"]
        assert row["rank"] == rank and len(row["times_s"]) == 1 and row["times_s"][0] > 0
        assert 0 < row["peak_bytes"] < 64 * MiB
        for strategy, entry in result["compared"].items():
            # the same weights and data: ours and native start from the same loss
            assert math.isclose(entry["first_loss"]["ours"], entry["first_loss"]["native"], rel_tol=1e-5), strategy
            assert entry["counts"] == {"ours": 1, "native": 1}
