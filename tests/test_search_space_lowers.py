"""Every strategy the default search space offers a model on 4 devices lowers, unless the search leaves it out
for a reason it shows: what the search can choose, lowering can do (GPT-2, LLaMA, T5, Swin; the embedding and
head vocab-parallel and, under vsp, sequence-parallel too).

Each distinct layer strategy is lowered once (several share a plan, one per body layer, so the redistribution
between them is lowered too), with every embedding strategy, on the first rank of every stage; the stage
holding the embedding is then wrapped for data parallelism under the fake process group."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.cluster import Cluster
from galvatron_fx.compile import build_cost_model
from galvatron_fx.models import build_model
from galvatron_fx.passes.lower.obstacles import lowering_obstacles
from galvatron_fx.passes.lower.pipeline import lower
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import LayerStrategy, Plan

WORLD, GLOBAL = 4, 8


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from galvatron_fx.runtime import groups

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()
    groups.clear_cache()


def _plans(program, cost_model, space: SearchSpace):
    """Plans that together lower every (layer type, strategy) the cost model allows, and every embedding strategy.
    Strategies that differ only in dp type or checkpointing rewrite the graph alike: each such family is lowered
    once per layer type, its members taking turns, so that every dp type and checkpointing still occur."""
    types = [layer.layer_type for layer in program.body]
    blocked = cost_model.model.epilogue.lowering_obstacles  # vtp{n}: vocab TP, vsp{n}: vsp over n ranks
    blocked_vtp = {int(k.removeprefix("vtp")) for k in blocked if k.startswith("vtp")}
    blocked_vsp = {int(k.removeprefix("vsp")) for k in blocked if k.startswith("vsp")}
    for pp in space.pp_degrees(WORLD, len(types)):
        devices = WORLD // pp
        for mode in space.default_dp_types():
            families: dict[tuple, list[LayerStrategy]] = {}
            for strategy in space.layer_strategies(devices, mode):
                for layer_type in set(types):
                    if cost_model.unsupported_reason(layer_type, strategy) is None:
                        key = (layer_type, strategy.tp, strategy.sp, strategy.tp_consecutive)
                        families.setdefault(key, []).append(strategy)
            wanted = sorted(families, key=str)
            embeddings = [
                e
                for e in space.embedding_strategies(devices, mode)
                if e.vtp not in (blocked_vsp if e.vsp else blocked_vtp)
            ]
            index = 0
            while wanted or index < len(embeddings):
                layers = []
                for layer_type in types:
                    key = next((k for k in wanted if k[0] == layer_type), None)
                    if key is None:
                        layers.append(LayerStrategy(dp=devices, dp_type=mode))
                        continue
                    wanted.remove(key)
                    layers.append(families[key][index % len(families[key])])
                yield Plan(
                    world_size=WORLD,
                    layers=tuple(layers),
                    pp=pp,
                    global_batch=GLOBAL,
                    embedding=embeddings[index % len(embeddings)],
                )
                index += 1


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "swin"])
def test_every_strategy_the_search_may_choose_lowers(name, fake_world):
    from galvatron_fx.runtime import groups
    from galvatron_fx.runtime.data_parallel import apply_data_parallel, prepare_groups

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, batch = build_model(name, batch=GLOBAL, seq=12)
    program = galvatron_fx.capture(model, example_kwargs=batch)
    cost_model = build_cost_model(program, Cluster.preset("A100-80GB", 1, WORLD))
    cost_model.model.add_lowering_obstacles(lowering_obstacles(program, WORLD))
    lowered = 0
    for plan in _plans(program, cost_model, SearchSpace(global_batch=(GLOBAL, GLOBAL, 1))):
        for stage in range(plan.pp):
            built = lower(program, plan, stage * plan.devices_per_stage)
            assert [item.strategy for item in built.stage_layers if item.kind in ("block", "transition")] == [
                plan.layers[i] for i in plan.stage_layers(stage)
            ]
            if stage == 0:
                groups.clear_cache()
                prepare_groups(program, plan)
                apply_data_parallel(built, program, plan)
        lowered += 1
    assert lowered >= 5


def test_what_lowering_cannot_shard_is_left_out_of_the_search_with_its_reason():
    from galvatron_fx.passes.search.engine import search

    warnings.simplefilter("ignore")
    model, batch = build_model("swin", batch=GLOBAL, seq=12)
    program = galvatron_fx.capture(model, example_kwargs=batch)
    cost_model = build_cost_model(program, Cluster.preset("A100-80GB", 1, WORLD))
    transition = next(layer.layer_type for layer in program.body if layer.kind == "transition")
    assert cost_model.unsupported_reason(transition, LayerStrategy(tp=2, dp=2)) is None  # priced as if it sharded
    cost_model.model.add_lowering_obstacles(lowering_obstacles(program, WORLD))
    reason = cost_model.unsupported_reason(transition, LayerStrategy(tp=2, dp=2))
    assert reason.startswith("lowering:") and "stay replicated" in reason
    plan = search(cost_model, WORLD, "80GB", SearchSpace(global_batch=(GLOBAL, GLOBAL, 1), disable_vsp=True))
    assert any("stay replicated" in entry for entry in plan.provenance["left_out"])
    assert all(
        cost_model.unsupported_reason(layer.layer_type, strategy) is None
        for layer, strategy in zip(program.body, plan.layers)
    )
