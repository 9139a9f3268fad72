"""Sequence and vocab parallelism lowered in one process (lowering is collective-free): which collectives
each layer gets, local shapes, and plans the graph cannot follow refused with a PlanError."""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import pytest
import torch

import galvatron_fx
from galvatron_fx.errors import PlanError
from galvatron_fx.models import build_model
from galvatron_fx.passes.lower.ops import collectives as C
from galvatron_fx.passes.lower.ops.vocab import masked_embedding, vocab_cross_entropy
from galvatron_fx.passes.lower.pipeline import lower
from galvatron_fx.passes.lower.stage import unwrap
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan
from galvatron_fx.program import layer_meta


@functools.lru_cache(maxsize=None)
def _program(name: str, batch: int = 2, seq: int = 16):
    torch.manual_seed(0)
    model, kwargs = build_model(name, batch=batch, seq=seq)
    return galvatron_fx.capture(model, example_kwargs=kwargs)


def _plan(program, world: int, sp: str, vtp: int = 1) -> Plan:
    layers = tuple(LayerStrategy(tp=world, dp=1, sp=sp) for _ in program.body)
    return Plan(
        world_size=world, layers=layers, global_batch=program.batch_size * world, embedding=EmbeddingStrategy(vtp=vtp)
    )


def _targets(module) -> list:
    return [n.target for n in unwrap(module).graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_megatron_sp_layer_collectives_and_shapes(name):
    program = _program(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = lower(program, _plan(program, 4, "megatron"), rank=1)
    block = program.body[0]
    targets = _targets(stage.layers[f"layer{block.index}"])
    # attention and MLP: gather before each column-parallel pair, reduce-scatter after each row-parallel end
    assert targets.count(C.sp_gather) == 2 and targets.count(C.sp_reduce_scatter) == 2
    assert C.tp_reduce not in targets
    gm = unwrap(stage.layers[f"layer{block.index}"])
    hidden = next(iter(gm.graph.find_nodes(op="placeholder")))
    out = gm.graph.output_node().args[0][0]
    # the layer runs the tp group's samples (dp 1: all 4 ranks'), with a quarter of the sequence each
    assert tuple(out.meta["val"].shape)[:2] == (program.batch_size * 4, 16 // 4)
    assert hidden.name in layer_meta(gm).seq_inputs
    # norms' weights are replicated and used on sequence shards: their gradients are partial sums over the group,
    # summed once per step after backward (runtime.data_parallel.PartialGradSum), not inside backward
    norm_params = [n for n in gm.graph.find_nodes(op="get_attr") if "norm" in n.target.lower() or "ln_" in n.target]
    partial = layer_meta(gm).partial_grads
    assert norm_params and all(partial.get(n.target) == (0, 1, 2, 3) for n in norm_params)
    assert not any(C.tp_copy in {u.target, *(v.target for v in u.users)} for n in norm_params for u in n.users)
    sharded_weights = set(layer_meta(gm).shards)  # the projections' shards have whole gradients of their own
    assert sharded_weights and not sharded_weights & set(partial)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_ulysses_layer_all_to_alls(name):
    program = _program(name)
    stage = lower(program, _plan(program, 2, "ulysses"), rank=0)
    targets = _targets(stage.layers[f"layer{program.body[-1].index}"])
    assert targets.count(C.seq_to_heads) == 3 and targets.count(C.heads_to_seq) == 1
    assert C.tp_reduce not in targets and C.sp_gather not in targets
    params = stage.user_parameters()
    full = {n: p for layer in program.layers for n, p in layer.module.named_parameters()}
    assert all(params[n].shape == full[n].shape for n in params)  # Ulysses keeps weights whole
    # every weight computes on sequence shards: each one's gradient is a partial sum over the group
    gm = unwrap(stage.layers[f"layer{program.body[-1].index}"])
    assert set(layer_meta(gm).partial_grads) == {t for t, _ in gm.named_parameters()}


def test_ulysses_degree_must_divide_heads():
    program = _program("llama")  # 4 attention heads
    with pytest.raises(PlanError, match="heads"):
        lower(program, _plan(program, 8, "ulysses"), rank=0)


def test_sequence_length_must_divide():
    program = _program("gpt2", batch=2, seq=6)
    with pytest.raises(PlanError, match="sequence length 6"):
        lower(program, _plan(program, 4, "megatron"), rank=0)


def test_vocab_parallel_shards_and_shares_tied_weights():
    program = _program("gpt2")
    stage = lower(program, _plan(program, 2, "none", vtp=2), rank=1)
    prologue, epilogue = (unwrap(stage.layers[f"layer{program.layers[i].index}"]) for i in (0, -1))
    assert prologue.get_parameter("lm_head.weight") is epilogue.get_parameter("lm_head.weight")
    assert tuple(prologue.get_parameter("lm_head.weight").shape) == (128, 64)
    assert vocab_cross_entropy in _targets(epilogue) and torch.ops.aten.cross_entropy_loss.default not in _targets(
        epilogue
    )


def test_vocab_parallel_functions_match_whole_vocabulary_in_one_process():
    torch.manual_seed(0)
    weight, ids = torch.randn(10, 4), torch.tensor([[0, 3, 9, 5]])
    assert torch.equal(masked_embedding(weight[5:], ids, 5) + masked_embedding(weight[:5], ids, 0), weight[ids])
    logits, target = torch.randn(6, 7, requires_grad=True), torch.tensor([0, 6, 3, -100, 2, 5])
    padded = torch.cat([logits, torch.zeros(6, 1)], 1)  # one padding column past the vocabulary of 7
    loss = vocab_cross_entropy(padded, target, 0, 7, (0,))
    expected = torch.nn.functional.cross_entropy(logits, target)
    assert abs(loss.item() - expected.item()) < 1e-6
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, expected_grad, atol=1e-6)


def test_pipeline_cut_sends_the_sequence_shard():
    program = _program("gpt2")
    layers = tuple(LayerStrategy(tp=2, dp=1, sp="megatron") for _ in program.body)
    plan = Plan(world_size=4, layers=layers, pp=2, global_batch=program.batch_size * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = lower(program, plan, rank=0), lower(program, plan, rank=2)
    # the tp group's samples (4), half of the sequence each: what Megatron-SP holds, nothing gathered first
    # (the causal mask is not sent: attention runs with is_causal=True)
    assert [tuple(s.shape) for s in first.send_specs] == [(program.batch_size * 2, 8, 64)]
    assert [tuple(s.shape) for s in second.recv_specs] == [tuple(s.shape) for s in first.send_specs]
    from galvatron_fx.passes.lower.ops.redistribute import redistribute

    receiver = unwrap(second.layers[f"layer{program.body[plan.pp_division[0]].index}"])
    received = next(n for n in receiver.graph.find_nodes(op="placeholder") if n.name == second.recv_specs[0].name)
    assert received.users and all(user.target is not redistribute for user in received.users)  # already in its layout


def test_a_stage_converts_a_value_once_per_layout(monkeypatch):
    """Layers reading one value in one layout share its conversion: one exchange forward, one backward on
    the summed gradient; another layout, or no shared context, exchanges again."""
    from galvatron_fx.passes.lower.ops import redistribute as R

    exchanges = []
    monkeypatch.setattr(R, "_exchange", lambda x, sends, recvs, ranks, cut, out: exchanges.append(x.shape) or x * 1.0)
    x = torch.ones(4, 3, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    box = ((0, 2), (0, 1), (0, 1))
    plan, other = (((1, box),), ((1, box),)), (((0, box),), ((0, box),))
    cut, lengths = (True, False, False), (4, 1, 3)
    with R.shared_conversions():
        first, again = (R.redistribute(x, plan, plan, (0, 1), cut, lengths) for _ in range(2))
        elsewhere = R.redistribute(x, other, other, (0, 1), cut, lengths)
        masks = [R.redistribute(mask, plan, plan, (0, 1), cut, lengths) for _ in range(3)]
    assert first is again and elsewhere is not first and masks[0] is masks[2]
    assert len(exchanges) == 3  # x twice (two layouts), the mask once
    (2 * first + 3 * again).sum().backward()
    assert len(exchanges) == 4 and torch.equal(x.grad, torch.full((4, 3), 5.0))
    assert R.redistribute(x, plan, plan, (0, 1), cut, lengths) is not first and len(exchanges) == 5  # no sharing


@pytest.mark.parametrize(
    "src,dst",
    [
        (("megatron", 2), ("none", 1)),
        (("none", 1), ("ulysses", 2)),
        (("megatron", 2), ("none", 2)),
        (("grid", 2), ("none", 1)),  # a grid's rows split the features: into the data split
        (("megatron", 2), ("grid", 2)),
        (("grid", 2), ("ulysses", 4)),
    ],
)
def test_redistribution_moves_only_missing_blocks(src, dst):
    from itertools import product

    from galvatron_fx.passes.lower.layouts import Layout, exchange_plan

    devices, lengths = 4, (8, 16, 8)  # samples, positions, features

    def layout(spec):
        sp, tp = spec
        strategy = LayerStrategy(tp=tp, dp=devices // tp, sp=sp if sp in ("megatron", "ulysses") else "none")
        return Layout(strategy, sp in ("megatron", "ulysses"), sp == "grid")

    def held(layout, me):
        return {
            point
            for point in product(*(range(n) for n in lengths))
            if all(i // (n // c) == k for i, n, c, k in zip(point, lengths, layout.chunks, layout.block(me)))
        }

    a, b = layout(src), layout(dst)
    for me in range(devices):
        sends, recvs = exchange_plan(a, b, devices, me, lengths)
        moved = sum(nb * ns * nf for peer, ((_, nb), (_, ns), (_, nf)) in recvs if peer != me)
        have, need = held(a, me), held(b, me)
        assert moved == len(need - have)  # every element it lacks arrives once; nothing it holds is sent to it


def test_a_parameter_other_layers_use_keeps_its_sum_inside_backward():
    """A step's sum of a layer's partial gradients would add another layer's whole gradient of a shared weight
    as well: such a weight's sequence-shard uses get ``tp_copy`` (their gradient summed inside backward)."""
    program = _program("llama")
    block, other = program.body[0], program.body[1]
    shared = next(n for n in block.param_names if "input_layernorm" in n)
    own = next(n for n in block.param_names if "post_attention_layernorm" in n)
    tied = dataclasses.replace(other, param_names=other.param_names + (shared,))  # as if layer 2 used it too
    changed = copy.copy(program)
    changed.layers = [tied if layer is other else layer for layer in program.layers]
    stage = lower(changed, _plan(program, 2, "megatron"), rank=0)
    gm = unwrap(stage.layers[f"layer{block.index}"])
    partial = layer_meta(gm).partial_grads
    assert own in partial and shared not in partial
    uses = [n for n in gm.graph.find_nodes(op="get_attr") if n.target == shared]
    # (through the data-parallel gradient scaling lowering puts on every parameter fetch)
    assert uses and all(C.tp_copy in {u.target, *(v.target for v in u.users)} for n in uses for u in n.users)
