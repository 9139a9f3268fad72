"""Grid tensor parallelism lowered at scale in one process: a 64-rank plan of a 24-layer LLaMA (grouped-query
attention) whose layers are 3D grids (q = 4) and 2D grids (q = 8), with one sample per rank in the embedding
and head, under the fake process group (the default tier lowers 3 layers, the full tier all 24). For every rank
and layer: each parameter's block has the shape the grid implies, the blocks of all 64 ranks together cover
every element of every weight equally often, and each collective runs over the group the grid names. Also: a
grid that cannot split a layer is refused with the obstacle named, and the search's obstacle table says so."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.errors import PlanError
from galvatron_fx.parallel_dims import ParallelDims
from galvatron_fx.passes.lower.obstacles import lowering_obstacles
from galvatron_fx.passes.lower.ops.collectives import sp_gather, sp_reduce_scatter, sp_split
from galvatron_fx.passes.lower.ops.grid import grid_param, row_mean
from galvatron_fx.passes.lower.ops.redistribute import redistribute
from galvatron_fx.passes.lower.pipeline import lower
from galvatron_fx.passes.lower.stage import unwrap
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import layer_meta

WORLD, LAYERS, GLOBAL_BATCH, SEQ = 64, 24, 64, 8
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 8, 4, 8, 128
CUBE = LayerStrategy(tp=64, tp_mode="3d")  # q = 4: 16 blocks of samples
SQUARE = LayerStrategy(tp=64, tp_mode="2d")  # q = 8
PATTERN = (CUBE, CUBE, SQUARE)


def _llama(layers: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=FFN,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, SEQ))
    return galvatron_fx.capture(model, example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False})


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def _expected_blocks(strategy: LayerStrategy) -> dict[str, tuple[int, ...]]:
    """Each weight's block per rank: 1/q³ (3D) or 1/q² (2D) of it, cut as the grid says."""
    q = strategy.grid_shape[0]
    if strategy.tp_mode == "3d":  # out over the pairs, in over the row, then the first dim over the column
        return {
            "self_attn.q_proj.weight": (HIDDEN // q // q, HIDDEN // q),
            "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM // q // q, HIDDEN // q),
            "self_attn.o_proj.weight": (HIDDEN // q // q, HIDDEN // q),
            "mlp.gate_proj.weight": (FFN // q // q, HIDDEN // q),
            "mlp.down_proj.weight": (HIDDEN // q // q, FFN // q),
            "input_layernorm.weight": (HIDDEN // q,),
        }
    # 2D (SUMMA's blocks): out over the row, in over the column (kv heads: q = 8 ranks share 4 of them)
    return {
        "self_attn.q_proj.weight": (HIDDEN // q, HIDDEN // q),
        "self_attn.k_proj.weight": (HEAD_DIM, HIDDEN // q),
        "self_attn.o_proj.weight": (HIDDEN // q, HIDDEN // q),
        "mlp.gate_proj.weight": (FFN // q, HIDDEN // q),
        "mlp.down_proj.weight": (HIDDEN // q, FFN // q),
        "input_layernorm.weight": (HIDDEN // q,),
    }


def _calls(module, fn):
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target is fn]


@pytest.mark.parametrize("layers", [len(PATTERN), pytest.param(LAYERS, marks=pytest.mark.full)])
def test_64_rank_grid_plan_lowers_with_checked_blocks_and_groups(layers, fake_world):
    program = _llama(layers)
    plan = Plan(
        world_size=WORLD, layers=tuple(PATTERN[i % len(PATTERN)] for i in range(layers)), global_batch=GLOBAL_BATCH
    )
    dims = ParallelDims.of(plan)
    coverage: dict[str, Counter] = {}
    warnings.simplefilter("ignore")
    for rank in range(WORLD):
        stage = lower(program, plan, rank)
        previous = "the embedding's data split"
        for layer in stage.stage_layers:
            module = unwrap(stage.layers[layer.name])
            if layer.kind != "block":
                continue
            strategy, groups = layer.strategy, dims.grid_groups(layer.strategy, rank)
            prefix = f"model.layers.{program.layers[layer.index].module_path.split('.')[-1]}."
            params = dict(module.named_parameters())
            for name, shape in _expected_blocks(strategy).items():
                assert tuple(params[prefix + name].shape) == shape, (rank, layer.name, name)
            for name, record in layer_meta(module).shards.items():
                assert record.ranks == groups.grid
                positions = record.positions()
                assert positions.numel() == params[name].numel()  # the record describes exactly the block held
                coverage.setdefault(name, (record.full_shape, record.replicas, Counter()))[2].update(positions.tolist())
            # collectives: samples or features over the row and pairs, weights over the column
            gathers = {n.args[4] for n in _calls(module, sp_gather)}  # (x, dim, sizes, index, ranks, ...)
            scatters = {n.args[-1] for n in _calls(module, sp_reduce_scatter)}
            if strategy.tp_mode == "3d":
                assert gathers == {groups.pairs, groups.row} and scatters == {groups.row, groups.pairs}
                assert len(_calls(module, sp_reduce_scatter)) == 7  # q, k, v, gate, up over the row; o, down
            else:
                assert gathers == {groups.row} and scatters == {groups.row}
            assert {n.args[2] for n in _calls(module, grid_param)} == {groups.column}
            assert {n.args[3] for n in _calls(module, row_mean)} == {groups.row}  # RMSNorm's mean over the row
            assert all(n.args[-1] == groups.row for n in _calls(module, sp_split))
            # a layer after another layout converts its input (its samples split another way); the same grid's not
            assert bool(_calls(module, redistribute)) == (previous != strategy)
            previous = strategy
    for name, (full_shape, replicas, counts) in coverage.items():  # over the 64 ranks, every element as often
        assert set(counts) == set(range(torch.Size(full_shape).numel())), name
        assert set(counts.values()) == {replicas}, name  # as many ranks as the record says hold each block


def test_a_grid_that_cannot_split_a_layer_is_refused_and_left_out_of_the_search(fake_world):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=20,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
    )
    ids = torch.randint(0, 64, (2, SEQ))
    small = galvatron_fx.capture(
        transformers.LlamaForCausalLM(config), example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False}
    )
    plan = Plan(world_size=64, layers=(SQUARE,) * 2, global_batch=64)
    with pytest.raises(PlanError, match="hidden size 20 is not divisible by the grid's row of 8"):
        lower(small, plan, 0)
    obstacles = lowering_obstacles(small, 64)[small.body[0].layer_type]
    assert "hidden size 20" in obstacles[SQUARE.lowering_key]
    for fits in (LayerStrategy(tp=4, tp_mode="2d"), LayerStrategy(tp=8, tp_mode="3d")):
        assert fits.lowering_key not in obstacles  # rows of 2 split 20 features
