"""CostModel time terms and moves against hand-computed cases (memory terms: test_cost_memory.py)."""

import dataclasses

import pytest
from cost_fixtures import BW, synthetic_profile, uniform_hardware

from galvatron_fx.cost.hardware import CommFit
from galvatron_fx.cost.layouts import reference_move_s
from galvatron_fx.cost.memory import InFlight
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.time_formula import TimeFormula
from galvatron_fx.errors import PlanError, ProfileError
from galvatron_fx.plan import EmbeddingStrategy, Plan
from galvatron_fx.plan import LayerStrategy as S


@pytest.fixture
def model():
    return CostModel(synthetic_profile(), uniform_hardware())


def test_tp_compute_communication_and_ddp_sync(model):
    cost = model.layer_cost("blk", S(tp=2, dp=2), micro_batch=8)  # 4 samples per replica, half the work each
    assert cost.fwd_s == pytest.approx(4e-3 / 2 + 2 * 4000 / BW)  # 2 all-reduces of 4 samples × 1000 B
    assert cost.bwd_s == pytest.approx(8e-3 / 2 + 2 * 4000 / BW)
    # DDP all-reduce of 500k fp32 gradients = 2 ms, all hidden behind 4 ms of backward, at 25% slowdown
    assert cost.grad_sync_s == pytest.approx(2e-3 * 0.25)
    assert cost.model_state_bytes == 500_000 * 16
    assert cost.activation_bytes == 5000 * 4 and cost.peak_extra_bytes == 0


def test_tp_ranks_each_pay_the_per_call_overhead():
    """A measured time's batch-independent part (launches, dispatch) does not shrink with tensor parallelism."""
    profile = synthetic_profile()
    block = dataclasses.replace(profile.types["blk"], fwd=TimeFormula(((0, 0, 1e-3), (1, 0, 1e-3))))
    cost = CostModel(dataclasses.replace(profile, types={"blk": block}), uniform_hardware())
    assert cost.layer_cost("blk", S(tp=2, dp=2), 8).fwd_s == pytest.approx(1e-3 + 4e-3 / 2 + 2 * 4000 / BW)
    assert cost.layer_cost("blk", S(tp=1, dp=4), 8).fwd_s == pytest.approx(1e-3 + 2e-3)


def test_checkpointing_recomputes_forward_and_keeps_inputs(model):
    plain = model.layer_cost("blk", S(tp=2, dp=2), 8)
    ckpt = model.layer_cost("blk", S(tp=2, dp=2, ckpt=True), 8)
    assert ckpt.bwd_s == pytest.approx(plain.bwd_s + plain.fwd_s)
    assert ckpt.fwd_s == plain.fwd_s
    assert ckpt.activation_bytes == 1000 * 4 and ckpt.peak_extra_bytes == plain.activation_bytes


def test_sequence_parallel_variants(model):
    sp = model.layer_cost("blk", S(tp=2, dp=2, sp="megatron"), 8)
    assert sp.fwd_s == pytest.approx(2e-3 + 2 * (4000 + 4000) / BW)  # 2 all-gathers + 2 reduce-scatters
    assert sp.activation_bytes == 8000 // 2 * 4  # everything sequence-sharded
    ulysses = model.layer_cost("blk", S(tp=2, dp=2, sp="ulysses"), 8)
    assert ulysses.fwd_s == pytest.approx(2e-3 + 4 * 2000 / BW)  # 4 all-to-alls of the local half
    assert ulysses.model_state_bytes == 1_000_000 * 16  # weights are not split
    # the DP all-reduce of its 4 MB of gradients, hidden behind 4 ms; then the same 4 MB summed over the tp
    # group (each rank computed them on its sequence shard), after the backward
    assert ulysses.grad_sync_s == pytest.approx(4e-3 * 0.25 + 4e-3)


def test_sequence_parallel_partial_gradients_cost_one_all_reduce_per_step():
    """Megatron-SP's norms and biases compute their gradients on sequence shards: one all-reduce over the tp
    group per step, after the gradient sync, whose few bytes cost its latency (and the ranks' arrival)."""
    hardware = uniform_hardware()
    slow = {k: CommFit(1e-3, BW) if k.startswith("all_reduce/2/") else v for k, v in hardware.collectives.items()}
    model = CostModel(synthetic_profile(), dataclasses.replace(hardware, collectives=slow))
    plain, sp = (model.layer_cost("blk", S(tp=2, dp=2, sp=mode), 8) for mode in ("none", "megatron"))
    assert sp.grad_sync_s == pytest.approx(plain.grad_sync_s + 1e-3, abs=1e-8)


def test_zero_stages(model):
    zero2 = model.layer_cost("blk", S(tp=1, dp=4, dp_type="zero2"), 8)
    # reduce-scatter 4 MB gradients + all-gather 4 MB parameters = 8 ms; 4 ms hide behind the backward
    assert zero2.grad_sync_s == pytest.approx(4e-3 + 4e-3 * 0.25)
    # the shard of the parameters stays besides the gathered ones during a step
    assert zero2.model_state_bytes == 1_000_000 * (4 + 12 / 4 + 4 / 4) and zero2.grad_bytes == 1_000_000 * 4 // 4
    assert zero2.peak_extra_bytes == 2 * 1_000_000 * 4  # this layer's unsharded gradients and the previous one's
    assert zero2.optimizer_temp_bytes == 0  # the default optimizer is fused on GPUs
    zero3 = model.layer_cost("blk", S(tp=1, dp=4, dp_type="zero3"), 8)
    assert zero3.fwd_s == pytest.approx(2e-3 + (4e-3 - 2e-3) + 2e-3 * 0.25)  # 4 ms gather vs 2 ms forward
    assert zero3.bwd_s == pytest.approx(4e-3 + 4e-3 * 0.25)
    assert zero3.grad_sync_s == pytest.approx(4e-3 * 0.25)
    assert zero3.model_state_bytes == 1_000_000 * 16 // 4
    # gathered parameters of this layer and the prefetched next; unsharded gradients of this and the previous
    assert zero3.peak_extra_bytes == 2 * (1_000_000 * 4 + 1_000_000 * 4)


def test_redistribution_between_layouts(model):
    assert model.redistribution_s(S(tp=2, dp=2), S(tp=2, dp=2, dp_type="zero3", ckpt=True), 1, 8) == 0.0
    # dp4 → tp2: each rank gathers its pair's samples (half of 8 × 1000 B); backward only slices
    assert model.redistribution_s(S(tp=1, dp=4), S(tp=2, dp=2), 1, 8) == pytest.approx(4000 / BW)
    # Megatron-SP → TP: forward slices, backward gathers the gradient halves
    assert model.redistribution_s(S(tp=2, dp=2, sp="megatron"), S(tp=2, dp=2), 1, 8) == pytest.approx(4000 / BW)
    # consecutive → strided TP: batch halves land on other ranks, both ways
    assert model.redistribution_s(S(tp=2, dp=2), S(tp=2, dp=2, tp_consecutive=False), 1, 8) == pytest.approx(
        2 * 4000 / BW
    )


def test_redistribution_cache_equals_direct_computation():
    """Cached answers equal the rank-by-rank computation for every layout pair, boundary and micro-batch, and
    boundaries whose activations differ in size are not confused."""
    profile = dataclasses.replace(synthetic_profile(), cut_bytes_per_sample=[1000, 3000, 1000, 2500])
    model = CostModel(profile, uniform_hardware())
    strategies = [
        S(tp=tp, dp=8 // tp, sp=sp, tp_consecutive=cons, dp_type=dp_type)
        for tp in (1, 2, 4, 8)
        for sp in (("none",) if tp == 1 else ("none", "megatron", "ulysses"))
        for cons in ((True,) if tp in (1, 8) else (True, False))
        for dp_type in ("ddp", "zero3")
    ]
    wide = [
        S(tp=tp, dp=32 // tp, sp=sp, tp_consecutive=cons)
        for tp in (1, 2, 4, 8, 16, 32)
        for sp in ("none", "megatron")
        for cons in (True, False)
        if (tp > 1 or sp == "none") and (1 < tp < 32 or cons)
    ]
    for a in wide:
        for b in wide:
            direct = reference_move_s(model.hardware, a, b, 8000.0) + reference_move_s(model.hardware, b, a, 8000.0)
            assert model.redistribution_s(a, b, 1, 8) == pytest.approx(0.0 if a == b else direct, abs=0.0)
    for boundary in (1, 2, 3):
        for mb in (8, 16):
            total = profile.cut_bytes_per_sample[boundary - 1] * mb * model.activation_scale
            for a in strategies:
                for b in strategies:
                    direct = (
                        0.0
                        if a == b
                        else reference_move_s(model.hardware, a, b, total)
                        + reference_move_s(model.hardware, b, a, total)
                    )
                    for _ in range(2):  # first call fills the cache, second reads it
                        assert model.redistribution_s(a, b, boundary, mb) == pytest.approx(direct, abs=0.0)
    dp8, tp2 = S(tp=1, dp=8), S(tp=2, dp=4)
    assert model.redistribution_s(dp8, tp2, 1, 8) > 0
    assert model.redistribution_s(dp8, tp2, 2, 8) == pytest.approx(3 * model.redistribution_s(dp8, tp2, 1, 8))


def test_p2p_in_flight_and_unsupported(model):
    assert model.p2p_s(0, 2, 4, 8, 1) == pytest.approx(2 * 8000 / 4 / BW)
    assert model.in_flight_micro_batches("gpipe", 4, 0, 8) == 8
    assert [model.in_flight_micro_batches("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert model.in_flight_micro_batches("1f1b", 4, 0, 2) == 2
    assert model.in_flight("1f1b", 4, 0, 2).later == 1
    assert model.unsupported_reason("blk", S(tp=4, dp=2)) is None
    assert model.unsupported_reason("blk", S(tp=8)) == "tp 8 does not divide 12 heads"
    odd_seq = CostModel(dataclasses.replace(synthetic_profile(), seq_length=30), uniform_hardware())
    assert "sequence length 30" in odd_seq.unsupported_reason("blk", S(tp=4, dp=2, sp="ulysses"))
    assert odd_seq.unsupported_reason("blk", S(tp=4, dp=2)) is None


def test_embedding_and_head_with_vocab_tp(model):
    cost = model.embedding_cost(EmbeddingStrategy(vtp=2), 4, 8, first_stage=True, last_stage=True)
    assert cost.fwd_s == pytest.approx(4000 / BW + 5e-4 * 4 / 2)  # embedding all-reduce + head compute
    assert cost.bwd_s == pytest.approx(1e-3 * 4 / 2 + 4000 / BW)  # head backward + its input-gradient all-reduce
    # one unit of 100k + 400k/2 (embedding) + 200k (head) params: a 2 MB all-reduce after the embedding's
    # backward, the last to run, which takes no time: nothing hides it; then the gradient norm's and the loss's
    # all-reduces (4 bytes each)
    assert cost.grad_sync_s == pytest.approx(2e-3 + 2 * 4 / BW)
    head_only = model.embedding_cost(EmbeddingStrategy(vtp=2), 4, 8, first_stage=False, last_stage=True)
    assert head_only.grad_sync_s == pytest.approx(
        0.8e-3 * 0.25 + 2 * 4 / BW
    )  # 0.8 ms hidden behind the head's 2 ms backward
    assert cost.model_state_bytes == (300_000 + 200_000) * 16
    assert cost.activation_bytes == (600 + 2000) * 4
    assert model.embedding_cost(EmbeddingStrategy(), 4, 8, first_stage=False, last_stage=False).fwd_s == 0.0


def test_stages_with_the_embedding_or_head_pay_the_steps_blocking_collectives():
    """After the gradient sync every rank all-reduces the gradient norm and the loss over the world, and a
    pipeline's first and last stages all-reduce a tied embedding/head weight's gradient; each waits for the
    slowest peer."""
    hardware = dataclasses.replace(uniform_hardware(), blocking_by_group_s={2: 1e-3, 8: 2e-3})
    tied = CostModel(dataclasses.replace(synthetic_profile(), tied_param_count=100_000), hardware)
    untied = CostModel(synthetic_profile(), hardware)
    norm_and_loss_s = 2 * (4 / BW + 2e-3)
    tied_s = 100_000 * 4 / 2 / BW + 1e-3  # the vtp 2 shard's fp32 gradient between 2 ranks

    def sync_s(model, first, last):
        return model.embedding_cost(EmbeddingStrategy(vtp=2), 4, 8, first_stage=first, last_stage=last).grad_sync_s

    assert sync_s(tied, False, True) - sync_s(untied, False, True) == pytest.approx(tied_s)
    assert sync_s(tied, True, False) - sync_s(untied, True, False) == pytest.approx(tied_s)
    assert sync_s(tied, True, True) <= sync_s(untied, True, True)  # one stage holds the weight once: no tied all-reduce
    no_dp = EmbeddingStrategy(vtp=8)  # nothing to synchronise but the step's collectives
    assert untied.embedding_cost(no_dp, 8, 8, first_stage=False, last_stage=True).grad_sync_s == pytest.approx(
        norm_and_loss_s
    )


def test_evaluate_follows_the_pipeline_formula(model):
    layers = [S(tp=2, dp=2), S(tp=2, dp=2), S(tp=1, dp=4, dp_type="zero3"), S(tp=1, dp=4, ckpt=True)]
    plan = Plan(world_size=8, layers=layers, pp=2, chunks=2, global_batch=16, embedding=EmbeddingStrategy(vtp=2))
    mb = 8
    deferred = plan.defers_grad_sync
    costs = [[model.layer_cost("blk", layers[i], mb, 1.0, deferred) for i in stage] for stage in ((0, 1), (2, 3))]
    embed = [
        model.embedding_cost(plan.embedding, 4, mb, first_stage=s == 0, last_stage=s == 1, deferred_sync=deferred)
        for s in (0, 1)
    ]
    split = S(dp=4)  # the embedding's output enters layer 0 (tp2) and layer 3 (dp4) feeds the head: by the data split
    busy = [
        sum(c.fwd_s + c.bwd_s for c in costs[0])
        + embed[0].fwd_s
        + embed[0].bwd_s
        + model.p2p_s(0, 2, 4, mb, 1)
        + model.redistribution_s(split, layers[0], 0, mb),
        sum(c.fwd_s + c.bwd_s for c in costs[1])
        + embed[1].fwd_s
        + embed[1].bwd_s
        + model.redistribution_s(layers[2], layers[3], 3, mb)
        + model.redistribution_s(layers[3], split, 4, mb),
    ]
    assert model.redistribution_s(split, layers[0], 0, mb) > 0 and model.redistribution_s(layers[3], split, 4, mb) == 0
    sync = [sum(c.grad_sync_s for c in costs[s]) + embed[s].grad_sync_s for s in (0, 1)]
    prediction = model.evaluate(plan)
    expected = sum(busy) + (2 - 1) * max(busy) + max(sync)
    assert prediction.iteration_time_s == pytest.approx(expected)
    assert prediction.samples_per_s == pytest.approx(16 / expected)
    # 1F1B with 2 micro-batches: stage 0 holds both at its first backward and one after it; the last stage
    # one, then one again (its second forward follows its first backward)
    in_flight = ((2, 1), (1, 1))
    for s in (0, 1):
        parts = costs[s] + [embed[s]]
        first, later = in_flight[s]
        memory = sum(
            c.model_state_bytes
            - c.grad_bytes
            + max(
                first * c.activation_bytes,
                later * c.activation_bytes + c.grad_bytes,
                c.grad_bytes + c.optimizer_temp_bytes,
            )
            for c in parts
        )
        memory += max(c.peak_extra_bytes for c in parts)
        assert prediction.memory_bound_bytes_per_stage[s] == memory
        walk = InFlight(first, later).stage_peak(
            ([embed[0]] if s == 0 else []) + costs[s] + ([embed[1]] if s == 1 else [])
        )
        assert prediction.memory_bytes_per_stage[s] == walk <= memory
    every = model.evaluate(dataclasses.replace(plan, grad_sync_every_micro_batch=True))
    assert every.iteration_time_s == pytest.approx(expected + max(2 * x for x in sync) - max(sync))
    with pytest.raises(ProfileError, match="world_size"):
        model.evaluate(Plan(world_size=4, layers=[S(tp=1, dp=4)] * 4, global_batch=8))
    with pytest.raises(PlanError, match="body layers"):
        model.evaluate(Plan(world_size=8, layers=[S(tp=1, dp=8)] * 3, global_batch=8))


def test_sharded_embedding_is_priced_as_it_runs_gathered_from_forward_to_backward(model):
    # the runtime keeps a sharded embedding/head gathered for the step (as FSDP2's root): ZeRO-2's price
    sharded = model.embedding_cost(EmbeddingStrategy(embed_sdp=True), 4, 8, first_stage=True, last_stage=True)
    zero2 = model.embedding_cost(EmbeddingStrategy(dp_type="zero2"), 4, 8, first_stage=True, last_stage=True)
    ddp = model.embedding_cost(EmbeddingStrategy(), 4, 8, first_stage=True, last_stage=True)
    assert sharded == zero2 and sharded.model_state_bytes < ddp.model_state_bytes
