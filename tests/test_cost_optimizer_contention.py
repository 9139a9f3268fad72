"""Cost terms measured by the hardware profiler: the optimizer step per parameter, the slowdown of compute
when the node's processes share cores, and the arrival skew of collectives between compute; and how CPUs
(no communication streams) expose ZeRO's collectives. Hand-computed cases, JSON round trip, bad values."""

import dataclasses
import json

import pytest
from cost_fixtures import synthetic_profile, uniform_hardware

from galvatron_fx.cost.hardware import CommFit, HardwareProfile
from galvatron_fx.cost.model import CostModel
from galvatron_fx.errors import ProfileError
from galvatron_fx.plan import EmbeddingStrategy, Plan
from galvatron_fx.plan import LayerStrategy as S


def test_optimizer_step_counts_the_parameters_the_device_updates():
    base = CostModel(synthetic_profile(), uniform_hardware())
    timed = CostModel(synthetic_profile(), dataclasses.replace(uniform_hardware(), optimizer_s_per_param=1e-9))
    for strategy, updated in (
        (S(tp=2, dp=4), 500_000),
        (S(tp=2, dp=4, dp_type="zero2"), 125_000),
        (S(tp=1, dp=8, dp_type="zero3"), 125_000),
    ):
        plain, with_step = base.layer_cost("blk", strategy, 8), timed.layer_cost("blk", strategy, 8)
        assert with_step.grad_sync_s == pytest.approx(plain.grad_sync_s + updated * 1e-9)
        assert (with_step.fwd_s, with_step.bwd_s) == (plain.fwd_s, plain.bwd_s)
    plan = Plan(world_size=8, layers=(S(dp=8),) * 4, global_batch=8)
    # one stage: every layer's step and the embedding/head's follow the sync, once per iteration
    params = 4 * 1_000_000 + 500_000 + 400_000
    assert timed.evaluate(plan).iteration_time_s == pytest.approx(base.evaluate(plan).iteration_time_s + params * 1e-9)


def test_compute_slowdown_scales_measured_compute_only():
    slow = dataclasses.replace(uniform_hardware(), compute_slowdown=2.0)
    measured = CostModel(synthetic_profile(), slow)
    plain = CostModel(synthetic_profile(), uniform_hardware())
    a, b = measured.layer_cost("blk", S(dp=8), 8), plain.layer_cost("blk", S(dp=8), 8)
    assert a.fwd_s == pytest.approx(2 * b.fwd_s) and a.bwd_s == pytest.approx(2 * b.bwd_s)
    analytic = dataclasses.replace(synthetic_profile(), mode="analytic")  # FLOPs ÷ a throughput: not one lone process
    assert CostModel(analytic, slow).layer_cost("blk", S(dp=8), 8).fwd_s == pytest.approx(b.fwd_s)


def test_pipeline_bubbles_lessen_the_contention():
    """Ranks idle in a pipeline's bubbles leave their cores to the others: on average c / (c + pp − 1) of
    the ranks compute at once, so compute slows down by max(1, slowdown · c / (c + pp − 1)), in the layer
    costs and in the whole plan."""
    slow = CostModel(synthetic_profile(), dataclasses.replace(uniform_hardware(), compute_slowdown=3.0))
    plain = CostModel(synthetic_profile(), uniform_hardware())
    assert slow.busy_share(1, 8) == 1.0 and slow.busy_share(4, 4) == pytest.approx(4 / 7)
    assert plain.busy_share(4, 4) == 1.0  # nothing to lessen: callers may share their tables
    base = plain.layer_cost("blk", S(dp=2), 8)
    shared = slow.layer_cost("blk", S(dp=2), 8, busy_share=4 / 7)
    assert shared.fwd_s == pytest.approx(base.fwd_s * 3 * 4 / 7)
    assert shared.bwd_s == pytest.approx(base.bwd_s * 3 * 4 / 7)
    assert slow.layer_cost("blk", S(dp=2), 8, busy_share=0.25).fwd_s == pytest.approx(
        base.fwd_s
    )  # fewer busy ranks than cores
    head = slow.embedding_cost(EmbeddingStrategy(), 2, 8, first_stage=True, last_stage=True, busy_share=0.5)
    assert head.fwd_s == pytest.approx(
        plain.embedding_cost(EmbeddingStrategy(), 2, 8, first_stage=True, last_stage=True).fwd_s * 1.5
    )
    pipeline = Plan(world_size=8, layers=(S(dp=2),) * 4, pp=4, pp_division=(1, 1, 1, 1), chunks=4, global_batch=32)
    # evaluate prices the plan at its own share: as a cluster slowed by 3 · 4/7 with every rank busy
    fixed = CostModel(synthetic_profile(), dataclasses.replace(uniform_hardware(), compute_slowdown=3 * 4 / 7))
    fixed.busy_share = lambda pp, chunks: 1.0
    assert slow.evaluate(pipeline).iteration_time_s == pytest.approx(
        fixed.evaluate(pipeline).iteration_time_s, rel=1e-12
    )


def test_hardware_json_keeps_the_new_figures_and_rejects_bad_ones(tmp_path):
    profile = dataclasses.replace(
        uniform_hardware(),
        optimizer_s_per_param=3e-9,
        compute_slowdown=1.5,
        blocking_collective_s=2e-3,
        blocking_by_group_s={2: 1e-3, 8: 2e-3},
        sharded_units={"zero3/2": CommFit(1e-3, 1e9)},
        blocking_growth_by_group={2: 0.05},
    )
    path = tmp_path / "hw.json"
    profile.save(path)
    loaded = HardwareProfile.load(path)
    assert (loaded.optimizer_s_per_param, loaded.compute_slowdown, loaded.blocking_collective_s) == (3e-9, 1.5, 2e-3)
    assert loaded.blocking_by_group_s == {2: 1e-3, 8: 2e-3} and loaded.sharded_units == {"zero3/2": CommFit(1e-3, 1e9)}
    assert loaded.blocking_growth_by_group == {2: 0.05}
    assert (loaded.blocking_s(1), loaded.blocking_s(2), loaded.blocking_s(4)) == (
        0.0,
        1e-3,
        2e-3,
    )  # unmeasured: all ranks'
    data = json.loads(path.read_text())
    for key in (
        "optimizer_s_per_param",
        "compute_slowdown",
        "blocking_collective_s",
        "blocking_by_group_s",
        "sharded_units",
        "blocking_growth_by_group",
    ):
        data.pop(key)  # older profiles still load
    path.write_text(json.dumps(data))
    loaded = HardwareProfile.load(path)
    assert (loaded.optimizer_s_per_param, loaded.compute_slowdown, loaded.blocking_collective_s) == (0.0, 1.0, 0.0)
    assert loaded.sharded_unit_s("zero3", 1e6, 2) is None
    for key, bad in (
        ("optimizer_s_per_param", -1.0),
        ("compute_slowdown", 0.5),
        ("blocking_collective_s", -1e-3),
        ("blocking_by_group_s", {"1": 1e-3}),
        ("sharded_units", {"zero1/2": [0.0, 1e9]}),
        ("blocking_growth_by_group", {"2": -0.1}),
    ):
        path.write_text(json.dumps({**data, key: bad}))
        with pytest.raises(ProfileError, match=key):
            HardwareProfile.load(path)


def test_cpu_exposes_zero_collectives_and_every_blocking_collective_pays_the_skew():
    skew = 2e-3
    gpu = dataclasses.replace(uniform_hardware(), blocking_collective_s=skew)
    cpu = dataclasses.replace(gpu, device="cpu")
    on_gpu, on_cpu = CostModel(synthetic_profile(), gpu), CostModel(synthetic_profile(), cpu)
    zero3 = S(tp=1, dp=4, dp_type="zero3")
    # 4 MB parameter gather (4 ms) per pass, 2 ms of forward compute: on a GPU 2 ms hide (at 25% slowdown)
    assert on_gpu.layer_cost("blk", zero3, 8).fwd_s == pytest.approx(2e-3 + 2e-3 + 2e-3 * 0.25)
    assert on_cpu.layer_cost("blk", zero3, 8).fwd_s == pytest.approx(2e-3 + 4e-3 + skew)  # waited for in place
    assert on_cpu.layer_cost("blk", zero3, 8).grad_sync_s == pytest.approx(4e-3 + skew)  # reduce-scatter, exposed
    zero2 = S(tp=1, dp=4, dp_type="zero2")  # reduce-scatter and all-gather: two collectives
    assert on_cpu.layer_cost("blk", zero2, 8).grad_sync_s == pytest.approx(8e-3 + 2 * skew)
    ddp = S(tp=1, dp=4)  # DDP's all-reduce runs asynchronously from backward hooks: hidden on both
    assert on_cpu.layer_cost("blk", ddp, 8).grad_sync_s == on_gpu.layer_cost("blk", ddp, 8).grad_sync_s
    plain = CostModel(synthetic_profile(), uniform_hardware())
    tp = S(tp=2, dp=2)  # 2 all-reduces per pass, each waited for by the compute after it
    assert on_gpu.layer_cost("blk", tp, 8).fwd_s == pytest.approx(plain.layer_cost("blk", tp, 8).fwd_s + 2 * skew)
    pairs = CostModel(
        synthetic_profile(), dataclasses.replace(gpu, blocking_by_group_s={2: skew / 4})
    )  # smaller groups wait less
    assert pairs.layer_cost("blk", tp, 8).fwd_s == pytest.approx(plain.layer_cost("blk", tp, 8).fwd_s + 2 * skew / 4)
    # a pipeline transfer is waited for by its receiver: forward and backward each pay a pair's skew
    assert pairs.p2p_s(0, 2, 4, 8, 1) == pytest.approx(plain.p2p_s(0, 2, 4, 8, 1) + 2 * skew / 4)


def test_the_arrival_skew_grows_with_the_compute_between_collectives():
    from galvatron_fx.cost.hardware import BLOCKING_PROBE_COMPUTE_S

    hw = dataclasses.replace(
        uniform_hardware(), device="cpu", blocking_by_group_s={2: 1e-3}, blocking_growth_by_group={2: 0.1}
    )
    assert hw.blocking_s(2) == hw.blocking_s(2, 1e-3) == 1e-3  # up to the probe's compute: as measured
    assert hw.blocking_s(2, BLOCKING_PROBE_COMPUTE_S + 20e-3) == pytest.approx(1e-3 + 0.1 * 20e-3)
    assert hw.blocking_s(4, 1.0) == hw.blocking_collective_s  # no growth measured for the group
    grows, flat = (
        CostModel(synthetic_profile(), hw),
        CostModel(synthetic_profile(), dataclasses.replace(hw, blocking_growth_by_group={})),
    )
    profile, mb = grows.model.layer("blk"), 64
    # TP: each of a direction's 2 all-reduces waits for the skew after half of the direction's compute
    tp = S(tp=2, dp=1)
    fwd, bwd = (grows.compute_s(profile, pass_, mb, 2, 1.0) for pass_ in ("fwd", "bwd"))
    assert fwd / 2 > BLOCKING_PROBE_COMPUTE_S and bwd / 2 > BLOCKING_PROBE_COMPUTE_S
    assert grows.layer_cost("blk", tp, mb).fwd_s - flat.layer_cost("blk", tp, mb).fwd_s == pytest.approx(
        2 * 0.1 * (fwd / 2 - BLOCKING_PROBE_COMPUTE_S)
    )
    assert grows.layer_cost("blk", tp, mb).bwd_s - flat.layer_cost("blk", tp, mb).bwd_s == pytest.approx(
        2 * 0.1 * (bwd / 2 - BLOCKING_PROBE_COMPUTE_S)
    )
    # ZeRO in place (CPU): the reduce-scatter waits for the skew after the layer's whole backward
    zero3 = S(tp=1, dp=2, dp_type="zero3")
    bwd = grows.compute_s(profile, "bwd", mb / 2, 1, 1.0)
    assert grows.layer_cost("blk", zero3, mb).grad_sync_s - flat.layer_cost(
        "blk", zero3, mb
    ).grad_sync_s == pytest.approx(0.1 * (bwd - BLOCKING_PROBE_COMPUTE_S))
    # DDP: the ranks meet only at the all-reduce after the step's backward; they drift over all of its compute
    ddp = S(tp=1, dp=2)
    work = sum(grows.compute_s(profile, pass_, mb / 2, 1, 1.0) for pass_ in ("fwd", "bwd"))
    assert grows.layer_cost("blk", ddp, mb).bwd_s - flat.layer_cost("blk", ddp, mb).bwd_s == pytest.approx(0.1 * work)
    assert grows.layer_cost("blk", ddp, mb).fwd_s == flat.layer_cost("blk", ddp, mb).fwd_s


def test_cpu_prices_zero_units_as_measured_in_place():
    """Where FSDP2 units were timed (CPU), a ZeRO layer's communication is that time, split as its collectives
    are (ZeRO-3 gathers in forward and again in backward and reduce-scatters; ZeRO-2's sync is both), plus
    the arrival skew of each collective."""
    unit = CommFit(1e-3, 1e9)  # 4 MB of fp32 parameters per layer: 5 ms a step
    skew = 1e-4
    cpu = dataclasses.replace(
        uniform_hardware(),
        device="cpu",
        blocking_collective_s=7.0,
        blocking_by_group_s={4: skew},
        sharded_units={"zero3/4": unit, "zero2/4": unit},
    )
    measured, plain = CostModel(synthetic_profile(), cpu), CostModel(synthetic_profile(), uniform_hardware())
    zero3, compute = S(tp=1, dp=4, dp_type="zero3"), plain.layer_cost("blk", S(tp=1, dp=4), 8)
    cost = measured.layer_cost("blk", zero3, 8)
    gather, scatter = 4e-3, 4e-3  # the raw collectives' 4 ms each (uniform fits): a third of the unit each
    # and each collective waits for the ranks to arrive from compute, which the probe does not
    assert cost.fwd_s - compute.fwd_s == pytest.approx(5e-3 * gather / (2 * gather + scatter) + skew)
    assert cost.bwd_s - compute.bwd_s == pytest.approx(5e-3 * gather / (2 * gather + scatter) + skew)
    assert cost.grad_sync_s == pytest.approx(5e-3 * scatter / (2 * gather + scatter) + skew)
    zero2 = measured.layer_cost("blk", S(tp=1, dp=4, dp_type="zero2"), 8)
    assert zero2.grad_sync_s == pytest.approx(5e-3 + 2 * skew) and zero2.fwd_s == pytest.approx(compute.fwd_s)
    assert measured.layer_cost("blk", S(tp=1, dp=2, dp_type="zero3"), 8).fwd_s > 7.0  # no unit for 2 ranks: skew
    profile = synthetic_profile()  # a layer without parameters (a transition) has nothing to gather or wait for
    empty = dataclasses.replace(profile, types={"blk": dataclasses.replace(profile.types["blk"], param_count=0)})
    bare = CostModel(empty, cpu).layer_cost("blk", zero3, 8)
    assert (bare.fwd_s, bare.grad_sync_s) == (compute.fwd_s, 0.0)
