"""CostModel's memory terms against hand-computed cases: what a step holds by phase, the backward walked layer
by layer, gradients that exist only after the first backward, DDP's buckets, bf16 bytes, the backward's working
set."""

import dataclasses

import numpy as np
import pytest
from cost_fixtures import synthetic_profile, uniform_hardware

from galvatron_fx.cost.data_parallel_cost import dp_comm
from galvatron_fx.cost.memory import InFlight
from galvatron_fx.cost.model import CostModel, LayerCost
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.errors import ConfigError
from galvatron_fx.plan import EmbeddingStrategy, Plan
from galvatron_fx.plan import LayerStrategy as S


@pytest.fixture
def model():
    return CostModel(synthetic_profile(), uniform_hardware())


def test_memory_phases_of_a_step():
    assert InFlight.of("gpipe", 4, 0, 8) == InFlight(8, 7)  # one backward done: one micro-batch fewer
    assert InFlight.of("1f1b", 4, 0, 8) == InFlight(4, 4)  # a new forward refills it
    assert InFlight.of("1f1b", 4, 0, 2) == InFlight(2, 1) and InFlight.of("1f1b", 1, 0, 1) == InFlight(1, 0)
    one = InFlight(1, 0)
    assert one.layer_bytes(100, 50, 20, 5) == 100 - 20 + 50  # activations without gradients peak first
    assert one.layer_bytes(100, 10, 20, 5) == 100 + 5  # the optimizer step: gradients + its temporaries
    assert InFlight(2, 2).layer_bytes(100, 10, 20, 5) == 100 + 2 * 10  # gradients of earlier micro-batches


def test_a_backward_adding_to_a_stored_gradient_holds_the_largest_weight_gradient():
    profile = synthetic_profile()
    block = dataclasses.replace(profile.types["blk"], largest_param_count=300_000)
    model = CostModel(dataclasses.replace(profile, types={"blk": block}), uniform_hardware())
    assert model.layer_cost("blk", S(tp=2, dp=1), 8).accumulate_bytes == 300_000 // 2 * 4  # TP splits the weight
    assert model.layer_cost("blk", S(tp=2, dp=2, sp="ulysses"), 8).accumulate_bytes == 300_000 * 4  # Ulysses does not
    # ZeRO's unsharded gradients are new in every backward: nothing is added to
    assert model.layer_cost("blk", S(dp=4, dp_type="zero3"), 8).accumulate_bytes == 0
    # a plain layer (gradients made by the step's first backward) adds only in later backwards
    plain = LayerCost(0, 0, 0, 100, 30, 5, grad_bytes=20, accumulate_bytes=7)
    assert InFlight(1, 0).stage_peak([plain]) == 80 + 30 + 5
    assert InFlight(2, 2).stage_peak([plain]) == 100 + 2 * 30 + 5 + 7
    # DDP's buckets persist between steps: the first backward adds too
    ddp = dataclasses.replace(plain, grad_bytes=0)
    assert InFlight(1, 0).stage_peak([ddp]) == 100 + 30 + 5 + 7
    assert plain.transient_bound_bytes == 12  # the search's bound covers it


def test_stage_peak_walks_the_backward_layer_by_layer():
    # the first layer's transient (60) comes when the second has freed its activations (50) and made its
    # gradient (20): 160 states without gradients + 20 + the first layer's 10 + 60
    first, second = LayerCost(0, 0, 0, 100, 10, 60, 20), LayerCost(0, 0, 0, 100, 50, 0, 20)
    assert InFlight(1, 0).stage_peak([first, second]) == 160 + 20 + 10 + 60
    bound = (
        sum(
            InFlight(1, 0).layer_bytes(c.model_state_bytes, c.activation_bytes, c.grad_bytes, 0)
            for c in (first, second)
        )
        + 60
    )
    assert bound == 290  # the search's additive bound puts the transient on top of every activation
    # swapped, the transient comes at the first backward's start: every activation is still there
    assert InFlight(1, 0).stage_peak([second, first]) == 160 + 60 + 60
    # a later backward: all gradients exist, two micro-batches are held (the one under backward frees as it goes)
    assert InFlight(2, 2).stage_peak([second, first]) == 200 + 2 * 60 + 60
    # the optimizer step: every state and its temporaries
    assert InFlight(1, 0).stage_peak([LayerCost(0, 0, 0, 100, 1, 0, 20, 500)]) == 600
    # the search's bound is never below the walk, whatever the layers and phases
    rng = np.random.default_rng(0)
    for _ in range(200):
        held_first = int(rng.integers(1, 5))
        held = InFlight(held_first, held_first - int(rng.integers(0, 2)))  # as InFlight.of makes them
        layers = [
            LayerCost(0, 0, 0, int(s), int(a), int(x), int(g), int(t), int(u))
            for s, a, x, g, t, u in zip(*(rng.integers(0, 1000, int(rng.integers(1, 6))) for _ in range(6)))
        ]
        layers = [
            dataclasses.replace(c, grad_bytes=min(c.grad_bytes, c.model_state_bytes) * int(rng.integers(0, 2)))
            for c in layers
        ]  # grad_bytes 0: DDP's persistent buckets
        bound = sum(
            held.layer_bytes(c.model_state_bytes, c.activation_bytes, c.grad_bytes, c.optimizer_temp_bytes)
            for c in layers
        )
        assert held.stage_peak(layers) <= bound + max(c.transient_bound_bytes for c in layers)


def test_single_micro_batch_plans_count_gradients_only_where_they_peak():
    model = CostModel(synthetic_profile(), uniform_hardware(world=2))
    mb = 2048  # 1024 samples per replica: a block's activations (8 MB) outweigh its gradients (2 MB shard)
    cost = model.layer_cost("blk", S(dp=2, dp_type="zero2"), mb)
    embedding = model.embedding_cost(EmbeddingStrategy(), 2, mb, first_stage=True, last_stage=True)

    def expected(held_first, held_later, cost=cost):
        return (
            sum(
                c.model_state_bytes
                - c.grad_bytes
                + max(
                    held_first * c.activation_bytes,
                    held_later * c.activation_bytes + c.grad_bytes,
                    c.grad_bytes + c.optimizer_temp_bytes,
                )
                for c in [cost] * 4 + [embedding]
            )
            + cost.transient_bound_bytes
        )

    transient = cost.peak_extra_bytes  # the unsharded gradients in backward
    layers = tuple(S(dp=2, dp_type="zero2") for _ in range(4))
    one = model.evaluate(Plan(world_size=2, layers=layers, chunks=1, global_batch=mb))
    assert one.memory_bound_bytes_per_stage == (expected(1, 0),)
    assert (
        one.memory_bound_bytes_per_stage[0]
        == 4 * (cost.model_state_bytes - cost.grad_bytes + cost.activation_bytes)
        + (
            embedding.model_state_bytes
            - embedding.grad_bytes
            + max(embedding.activation_bytes, embedding.grad_bytes + embedding.optimizer_temp_bytes)
        )
        + transient
    )
    two = model.evaluate(
        Plan(world_size=2, layers=layers, chunks=2, global_batch=2 * mb)
    )  # accumulation: gradients persist, unsharded until the last micro-batch's reduce-scatter
    deferred = model.layer_cost("blk", S(dp=2, dp_type="zero2"), mb, deferred_sync=True)
    assert deferred.grad_bytes == 2 * cost.grad_bytes  # the whole fp32 gradient, not its half
    assert deferred.model_state_bytes - deferred.grad_bytes == cost.model_state_bytes - cost.grad_bytes
    assert two.memory_bound_bytes_per_stage == (expected(1, 1, deferred),)
    # held from the first backward, the unsharded gradients are not new in a backward: it adds the shards the
    # reduce-scatters write (this layer's and the previous one's: 1 / dp of what a synced backward makes)
    assert deferred.peak_extra_bytes == transient // 2
    assert two.memory_bound_bytes_per_stage[0] > one.memory_bound_bytes_per_stage[0]
    # the predicted peak: the last layer's backward, the head's activations freed and its gradients made;
    # below the bound, which counts the head's activations there too
    states = 4 * cost.model_state_bytes + embedding.model_state_bytes - 4 * cost.grad_bytes
    assert one.memory_bytes_per_stage[0] == states + 4 * cost.activation_bytes + transient
    assert one.memory_bytes_per_stage[0] < one.memory_bound_bytes_per_stage[0]


def test_plan_table_shows_the_predicted_peak_and_the_searchs_budget():
    from galvatron_fx.report import plan_table

    model = CostModel(synthetic_profile(), uniform_hardware(world=2))
    # the first layer's gathers and recomputation come after the later layers have freed their activations
    plan = Plan(world_size=2, layers=(S(dp=2, dp_type="zero3", ckpt=True),) + (S(dp=2),) * 3, global_batch=2048)
    prediction = model.evaluate(plan)
    peak, bound = prediction.memory_bytes_per_stage[0], prediction.memory_bound_bytes_per_stage[0]
    assert bound - peak > 2**20
    rows = [line.split() for line in plan_table(plan, model).splitlines()]
    assert ["stage", "layers", "predicted", "peak", "GiB/device", "budgeted", "GiB/device"] in rows
    assert ["0", "4", f"{peak / 2**30:.3f}", f"{bound / 2**30:.3f}"] in rows


def test_ddp_gradients_live_in_persistent_buckets_that_pay_one_latency_each():
    from galvatron_fx.cost.memory import GRAD_BUCKET_CAP_BYTES

    model = CostModel(synthetic_profile(), uniform_hardware(world=2))
    ddp = model.layer_cost("blk", S(dp=2), 2048)
    assert ddp.grad_bytes == 0 and ddp.model_state_bytes == 1_000_000 * 16  # the gradients are always there
    layers = tuple(S(dp=2) for _ in range(4))
    one, two = (model.evaluate(Plan(world_size=2, layers=layers, chunks=c, global_batch=c * 2048)) for c in (1, 2))
    assert one.memory_bytes_per_stage == two.memory_bytes_per_stage
    # a 4 MB gradient pays 4 MB / 25 MiB of the all-reduce latency (the rest of its bucket pays the rest)
    fit = model.hardware.fit("all_reduce", 2)
    sync = dp_comm(model, 1_000_000, 2, "ddp", True)[1]
    assert sync == pytest.approx(fit.latency_s * 4e6 / GRAD_BUCKET_CAP_BYTES + 4e6 / fit.bandwidth_Bps)
    assert dp_comm(model, 100_000_000, 2, "ddp", True)[1] == pytest.approx(
        fit.time_s(4e8)
    )  # above the cap: its own bucket


def test_bf16_mixed_precision_bytes():
    """bf16 as the runtime runs it: fp32 masters, gradients and moments (16 bytes); a replicated layer keeps
    a bf16 cast of its weights per micro-batch besides its halved activations; ZeRO gathers 2-byte
    parameters (ZeRO-2 keeps them) and reduce-scatters 4-byte gradients."""
    fp32 = CostModel(synthetic_profile(), uniform_hardware())
    bf16 = CostModel(synthetic_profile(), uniform_hardware(), mixed_precision="bf16")
    cost = bf16.layer_cost("blk", S(), 8)
    assert cost.model_state_bytes == 1_000_000 * 16
    assert cost.activation_bytes == 8000 * 8 // 2 + 1_000_000 * 2
    zero2 = bf16.layer_cost("blk", S(dp=4, dp_type="zero2"), 8)
    assert zero2.model_state_bytes == 1_000_000 * (2 + 4 / 4 + 12 / 4) and zero2.activation_bytes == 8000 * 2 // 2
    hw = bf16.hardware
    gather, _, transient = dp_comm(bf16, 1_000_000, 4, "zero3", True)
    assert gather == pytest.approx(hw.collective_s("all_gather", 2e6, 4, True))
    assert transient == 2 * (2e6 + 4e6) and dp_comm(fp32, 1_000_000, 4, "zero3", True)[2] == 2 * (4e6 + 4e6)
    with pytest.raises(ConfigError, match="mixed_precision"):
        CostModel(synthetic_profile(), uniform_hardware(), mixed_precision="fp8")


def test_backward_working_set_is_a_transient_of_its_layer():
    plain, profile = CostModel(synthetic_profile(), uniform_hardware()), synthetic_profile()
    profile.types["blk"].grad_working_bytes_per_sample = {1: 300, 2: 200}
    profile.epilogue.grad_working_bytes_per_sample = {1: 5000}
    working = CostModel(profile, uniform_hardware())
    for strategy, per_sample in (
        (S(dp=8), 300),
        (S(tp=2, dp=4), 200),
        (S(tp=2, dp=4, sp="megatron"), 150),
        (S(dp=8, ckpt=True), 300),
    ):
        a, b = plain.layer_cost("blk", strategy, 16), working.layer_cost("blk", strategy, 16)
        assert b.peak_extra_bytes - a.peak_extra_bytes == per_sample * 16 // strategy.dp
        assert b.activation_bytes == a.activation_bytes and b.model_state_bytes == a.model_state_bytes
    # one stage: the head's backward runs first, while every activation is live, so its working set adds to
    # the peak there; the embedding/head unit's budget carries the larger of the two parts'
    plan = Plan(
        world_size=8, layers=[S(dp=8)] * 4, pp=1, chunks=1, global_batch=8192
    )  # activations outweigh Adam's step
    before, after = plain.evaluate(plan), working.evaluate(plan)
    assert after.memory_bytes_per_stage[0] - before.memory_bytes_per_stage[0] == 5000 * 1024
    assert after.memory_bound_bytes_per_stage[0] - before.memory_bound_bytes_per_stage[0] == 5000 * 1024
    # profiles keep the table; files without it (older ones, Galvatron's) load with none
    data = profile.to_json_dict()
    assert ModelProfile.from_json_dict(data).types["blk"].grad_working_bytes_per_sample == {1: 300, 2: 200}
    del data["types"]["blk"]["grad_working_bytes_per_sample"]
    assert ModelProfile.from_json_dict(data).types["blk"].grad_working_per_sample(2, False) == 0.0
