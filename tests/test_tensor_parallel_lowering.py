"""Lowering at scale in one process: a 64-rank plan (pp 4 × tp 4 × dp 4, layers of different tp) of a
24-layer LLaMA (grouped-query attention), under the fake process group. Every rank's stage is built and its
parameter shards, rewritten view sizes and collectives are checked against what the plan implies."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.parallel_dims import ParallelDims
from galvatron_fx.passes.lower.ops.collectives import tp_copy, tp_reduce
from galvatron_fx.passes.lower.ops.redistribute import redistribute
from galvatron_fx.passes.lower.pipeline import lower
from galvatron_fx.passes.lower.stage import unwrap
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import layer_meta

WORLD, PP, LAYERS, GLOBAL_BATCH, SEQ = 64, 4, 24, 32, 8
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 128
PATTERN = (4, 2, 4, 1, 4, 2)  # tp per layer; dp = 16 / tp


@pytest.fixture(scope="module")
def program():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    capture_batch = GLOBAL_BATCH // (WORLD // PP)
    ids = torch.randint(0, 128, (capture_batch, SEQ))
    return galvatron_fx.capture(model, example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False})


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def _plan() -> Plan:
    layers = tuple(
        LayerStrategy(tp=tp, dp=16 // tp, tp_consecutive=(i % 4 != 1))
        for i, tp in ((i, PATTERN[i % len(PATTERN)]) for i in range(LAYERS))
    )
    return Plan(world_size=WORLD, layers=layers, pp=PP, global_batch=GLOBAL_BATCH)


def _calls(module, fn):
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target is fn]


def test_64_rank_plan_lowers_with_checked_shards_views_and_collectives(program, fake_world):
    plan = _plan()
    warnings.simplefilter("ignore")
    for rank in range(WORLD):
        stage = lower(program, plan, rank)
        stage_ranks = tuple(range(stage.position.stage * 16, stage.position.stage * 16 + 16))
        previous = None
        for layer in stage.stage_layers:
            module = unwrap(stage.layers[layer.name])
            strategy = layer.strategy
            if layer.kind != "block":
                assert not layer_meta(module).shards
                previous = strategy
                continue
            tp, local_batch = strategy.tp, GLOBAL_BATCH // strategy.dp
            prefix = f"model.layers.{program.layers[layer.index].module_path.split('.')[-1]}."
            params = dict(module.named_parameters())
            # parameter shards: heads, kv heads (shared by pairs when tp > kv heads), MLP columns
            expected = {
                "self_attn.q_proj.weight": (HIDDEN // tp, HIDDEN),
                "self_attn.k_proj.weight": (max(KV_HEADS // tp, 1) * HEAD_DIM, HIDDEN),
                "self_attn.o_proj.weight": (HIDDEN, HIDDEN // tp),
                "mlp.gate_proj.weight": (FFN // tp, HIDDEN),
                "mlp.down_proj.weight": (HIDDEN, FFN // tp),
                "input_layernorm.weight": (HIDDEN,),
            }
            for name, shape in expected.items():
                assert tuple(params[prefix + name].shape) == shape, (
                    rank,
                    layer.name,
                    name,
                    params[prefix + name].shape,
                )
            group = ParallelDims.of(plan).tp_group(strategy, rank)
            assert rank in group and len(group) == tp
            if tp > 1:
                q = layer_meta(module).shards[prefix + "self_attn.q_proj.weight"]
                assert q.full_shape == (HIDDEN, HIDDEN) and q.ranks == group
                rows = q.select(torch.arange(HIDDEN)[:, None].expand(HIDDEN, HIDDEN))[:, 0]
                first = group.index(rank) * HIDDEN // tp
                assert rows.tolist() == list(range(first, first + HIDDEN // tp))  # this rank's heads, whole
                assert q.replicas == 1 and layer_meta(module).shards[
                    prefix + "self_attn.k_proj.weight"
                ].replicas == max(tp // KV_HEADS, 1)
                # collectives: one all-reduce after each row-parallel projection, copies on the tp group
                assert [n.args[1] for n in _calls(module, tp_reduce)] == [group, group]
                assert all(n.args[1] == group for n in _calls(module, tp_copy))
            else:
                assert not _calls(module, tp_reduce) and not layer_meta(module).shards
            # views of the attention: this layer's local batch and local heads
            # (the batch is read from the tensor, so the sizes say "B" and the metadata the local batch)
            head_views = [
                n
                for n in module.graph.nodes
                if n.target is torch.ops.aten.view.default and len(n.args[1]) == 4 and n.args[1][-1] == HEAD_DIM
            ]
            assert head_views and all(
                isinstance(v.args[1][0], torch.fx.Node)
                and v.args[1][1] == SEQ
                and tuple(v.meta["val"].shape[:2]) == (local_batch, SEQ)
                for v in head_views
            ), (rank, layer.name)
            expands = [
                n for n in module.graph.nodes if n.target is torch.ops.aten.expand.default and len(n.args[1]) == 5
            ]
            local_kv = (max(KV_HEADS // tp, 1), HEADS // KV_HEADS // max(tp // KV_HEADS, 1), SEQ, HEAD_DIM)
            assert [tuple(n.args[1][1:]) for n in expands] == [local_kv] * 2
            assert [tuple(n.meta["val"].shape) for n in expands] == [(local_batch, *local_kv)] * 2
            # redistribution on entry exactly when the producer's layout differs, over the stage's ranks
            moves = _calls(module, redistribute)
            if previous is not None and (previous.dp, previous.tp_consecutive if previous.tp > 1 else True) != (
                strategy.dp,
                strategy.tp_consecutive if strategy.tp > 1 else True,
            ):
                assert moves and all(n.args[3] == stage_ranks for n in moves)
            if previous is not None and previous == strategy:
                assert not [n for n in moves if n.args[0].name == layer.input_names[0]]
            previous = strategy
        sizes = {spec.name: spec.shape[0] for spec in stage.send_specs if spec.batched}
        if sizes:  # what crosses a cut is the last layer's block
            assert set(sizes.values()) <= {GLOBAL_BATCH // s.dp for s in plan.layers} | {GLOBAL_BATCH // 16}
