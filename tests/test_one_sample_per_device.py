"""One sample per device: the shape of large-model plans (tensor parallelism, micro-batches of one sample per
rank). The Program is captured once, its batch a symbol, so every layer runs at the batch its strategy gives
it, 1 included. TP2 on 4 ranks with a global batch of 4 and PP2 × TP2 with 2 micro-batches train like eager
(SGD); a 64-rank PP8 × TP8 plan with 2 micro-batches (LLaMA-2-7B's shape at 16 GiB) lowers on every rank."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from distributed import build, check_parity, optimizer_factory, train_eager

from galvatron_fx.plan import LayerStrategy, Plan

GLOBAL = 4
PLANS = {"tp2": dict(pp=1, chunks=1), "pp2_tp2": dict(pp=2, chunks=2)}
MODELS = ("gpt2", "llama")


def _batches(name: str):
    model, batches = build(name)
    return model, [
        {k: v[:GLOBAL] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in b.items()} for b in batches
    ]


def _plan(recipe: str, num_layers: int) -> Plan:
    shape = PLANS[recipe]
    devices = 4 // shape["pp"]
    return Plan(
        world_size=4,
        layers=(LayerStrategy(tp=2, dp=devices // 2),) * num_layers,
        pp=shape["pp"],
        chunks=shape["chunks"],
        global_batch=GLOBAL,
    )


def _worker(rank: int, world_size: int) -> dict:
    from distributed import _config

    import galvatron_fx
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    out = {}
    for name in MODELS:
        model, batches = _batches(name)
        program = galvatron_fx.capture(model, example_kwargs=batches[0])  # the global batch: 4 samples
        for recipe in PLANS:
            plan = _plan(recipe, len(program.body))
            trainer = Trainer(program, plan, config=_config(), optimizer=optimizer_factory("sgd"))
            assert trainer.stage.micro_batch == 1  # each rank's own samples per micro-batch
            losses = [float(trainer.step(batch)) for batch in batches]
            params = trainer.full_parameters()
            out[f"{name}/{recipe}"] = {"losses": losses, "params": params if trainer.stage.position.local == 0 else {}}
    return out


@pytest.fixture(scope="module")
def results():
    from galvatron_fx.runtime import spawn

    return spawn(_worker, 4, timeout_s=900)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("recipe", list(PLANS))
def test_one_sample_per_device_trains_like_eager(results, name, recipe):
    reference = train_eager(*_batches(name), "sgd")
    merged = {
        "losses": [r[f"{name}/{recipe}"]["losses"] for r in results],
        "params": [r[f"{name}/{recipe}"]["params"] for r in results if r[f"{name}/{recipe}"]["params"]],
    }
    check_parity(name, merged, reference=reference)


def test_tp8_plan_with_one_sample_per_device_lowers_on_64_ranks():
    import transformers
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import galvatron_fx
    from galvatron_fx.passes.lower.pipeline import lower
    from galvatron_fx.passes.lower.stage import unwrap
    from galvatron_fx.program import node_meta
    from galvatron_fx.runtime import groups
    from galvatron_fx.runtime.data_parallel import apply_data_parallel, prepare_groups

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=96,
        max_position_embeddings=32,
    )
    ids = torch.randint(0, 128, (16, 12))
    program = galvatron_fx.capture(
        transformers.LlamaForCausalLM(config), example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False}
    )
    plan = galvatron_fx.uniform_plan(pp=8, tp=8, chunks=2, ckpt=True).resolve(len(program.body), 64, 16)
    assert plan.micro_batch // plan.devices_per_stage == 1
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=64)
    warnings.simplefilter("ignore")
    try:
        prepare_groups(program, plan)
        for rank in range(64):
            stage = lower(program, plan, rank)
            for layer in stage.stage_layers:
                module = unwrap(stage.layers[layer.name])
                outputs = module.graph.output_node().args[0]
                batches = {int(o.meta["val"].shape[0]) for o in outputs if node_meta(o).batched}
                # the embedding and head hold each rank's own sample; the tp8 blocks the group's 8
                assert batches == ({1} if layer.kind in ("prologue", "epilogue") else {8}), (rank, layer.name, batches)
                if layer.kind == "block":
                    assert module.get_parameter(f"model.layers.{layer.index - 1}.self_attn.q_proj.weight").shape == (
                        8,
                        64,
                    )
            if rank % 8 == 0:
                apply_data_parallel(stage, program, plan)
    finally:
        dist.destroy_process_group()
        groups.clear_cache()
