"""Orderings on a real captured model (GPT-2 small, analytic profile on an A100 preset)."""

import warnings

import pytest

from galvatron_fx import Cluster, capture
from galvatron_fx.cost.memory import grad_working_bytes, tp_activation_split
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.models import build_model
from galvatron_fx.plan import LayerStrategy as S
from galvatron_fx.plan import Plan


@pytest.fixture(scope="module")
def gpt2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = build_model("gpt2", batch=4, seq=32)
        program = capture(model, example_kwargs=kwargs)
    cluster = Cluster.preset("A100-80GB", nodes=1, devices_per_node=8)
    profile = ModelProfile.from_program(program, flops_per_s=cluster.sustained_flops["fp32"])
    return program, profile, CostModel(profile, cluster.hardware_profile())


def test_graph_split_and_profile_shape(gpt2):
    program, profile, _ = gpt2
    replicated, sharded = tp_activation_split(program.graph_module, program.body[0])
    assert replicated > 0 and sharded > 0
    assert replicated + sharded == program.body[0].stats.saved_activation_bytes
    block = profile.types[program.body[0].layer_type]
    assert profile.num_heads == 4 and profile.seq_length == 32 and profile.hidden_size == 64
    assert block.activation_bytes_per_sample[1] * 4 == program.body[0].stats.saved_activation_bytes
    assert block.boundary_bytes_per_sample == 32 * 64 * 4
    assert block.fwd(4, 32) == pytest.approx(
        program.body[0].stats.fwd_flops / Cluster.preset("A100-80GB").sustained_flops["fp32"]
    )
    assert profile.prologue.vocab_param_count == 256 * 64 and profile.epilogue.vocab_param_count == 256 * 64


def test_backward_working_set_is_per_sample_and_shards_under_tp(gpt2):
    program, profile, _ = gpt2
    block = program.body[0]
    working = {tp: grad_working_bytes(program.graph_module, block, tp) for tp in (1, 2, 4)}
    # the gradient the next layer hands back is live when the block's backward starts; the MLP's inner
    # gradients are 4x wider, and Megatron TP splits them
    assert working[1] >= 4 * 32 * 64 * 4
    assert working[1] > working[2] > working[4] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = build_model("gpt2", batch=2, seq=32)
        half = capture(model, example_kwargs=kwargs)
    assert grad_working_bytes(half.graph_module, half.body[0]) * 2 == working[1]
    assert profile.types[block.layer_type].grad_working_bytes_per_sample[2] == working[2] // 4
    assert profile.epilogue.grad_working_per_sample(1, False) >= 32 * 256 * 4  # the logits' gradient


def test_more_tp_less_memory_per_device(gpt2):
    _, profile, model = gpt2
    kind = profile.layer_types[0]
    totals = []
    for tp in (1, 2, 4):
        cost = model.layer_cost(kind, S(tp=tp, dp=4 // tp), micro_batch=8)
        totals.append(cost.model_state_bytes + cost.activation_bytes)
    assert totals[0] > totals[1] > totals[2]


def test_zero_shards_model_states(gpt2):
    _, profile, model = gpt2
    kind = profile.layer_types[0]
    states = {t: model.layer_cost(kind, S(dp=4, dp_type=t), 8).model_state_bytes for t in ("ddp", "zero2", "zero3")}
    assert states["zero3"] < states["zero2"] < states["ddp"]


def test_checkpointing_trades_time_for_memory(gpt2):
    _, profile, model = gpt2
    kind = profile.layer_types[0]
    plain, ckpt = (model.layer_cost(kind, S(tp=2, dp=2, ckpt=c), 8) for c in (False, True))
    assert ckpt.activation_bytes < plain.activation_bytes
    assert ckpt.fwd_s + ckpt.bwd_s > plain.fwd_s + plain.bwd_s


def test_1f1b_holds_fewer_micro_batches_than_gpipe(gpt2):
    _, profile, model = gpt2
    layers = [S(tp=1, dp=2)] * len(profile.layer_types)
    gpipe = Plan(world_size=8, layers=layers, pp=4, chunks=8, global_batch=16, pipeline="gpipe")
    one_f_one_b = Plan(world_size=8, layers=layers, pp=4, chunks=8, global_batch=16, pipeline="1f1b")
    for stage in range(4):
        assert model.in_flight_micro_batches("1f1b", 4, stage, 8) < model.in_flight_micro_batches("gpipe", 4, stage, 8)
    memory_gpipe, memory_1f1b = (
        model.evaluate(gpipe).memory_bytes_per_stage,
        model.evaluate(one_f_one_b).memory_bytes_per_stage,
    )
    assert all(a < b for a, b in zip(memory_1f1b, memory_gpipe))
    assert model.evaluate(gpipe).iteration_time_s == pytest.approx(model.evaluate(one_f_one_b).iteration_time_s)


def test_tied_embedding_and_head_count_once_on_one_stage(gpt2):
    from galvatron_fx.cost.memory import model_state_bytes
    from galvatron_fx.plan import EmbeddingStrategy

    _, profile, model = gpt2
    assert profile.tied_param_count == 256 * 64  # GPT-2 ties wte and lm_head
    embedding = EmbeddingStrategy()
    costs = {
        (first, last): model.embedding_cost(embedding, 4, 8, first_stage=first, last_stage=last)
        for first, last in ((True, False), (False, True), (True, True))
    }
    apart = costs[True, False].model_state_bytes + costs[False, True].model_state_bytes
    tied_bytes = model_state_bytes(profile.tied_param_count, 4, "ddp", "fp32")
    assert costs[True, True].model_state_bytes == pytest.approx(apart - tied_bytes, abs=16)


def test_analytic_times_take_the_contention_a_pipeline_leaves(gpt2):
    """An analytic profile's throughput is measured with every rank computing (profile-hardware's matmul):
    without a pipeline its times stand as they are; a pipeline's ranks compute for c / (c + pp − 1) of the
    step, and share the cores with fewer others, so their compute takes max(1, slowdown · share) / slowdown."""
    import dataclasses

    _, profile, model = gpt2
    hardware = dataclasses.replace(model.hardware, compute_slowdown=2.0)
    shared = CostModel(profile, hardware)
    kind, layer = profile.layer_types[0], S(tp=1, dp=1)
    alone = model.layer_cost(kind, layer, micro_batch=8)
    assert shared.layer_cost(kind, layer, micro_batch=8).fwd_s == pytest.approx(alone.fwd_s)
    share = shared.busy_share(4, 4)
    assert share == pytest.approx(4 / 7)
    piped = shared.layer_cost(kind, layer, micro_batch=8, busy_share=share)
    assert piped.fwd_s == pytest.approx(alone.fwd_s * max(1.0, 2.0 * share) / 2.0)
