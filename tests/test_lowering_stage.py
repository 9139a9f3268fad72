"""Lowering a Program + Plan to one rank's stage, in one process: stage contents, cuts, checks, dumps,
and group construction for a 64-rank plan under the fake process group."""

import functools

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.errors import PlanError
from galvatron_fx.models import build_model
from galvatron_fx.parallel_dims import ParallelDims
from galvatron_fx.passes.lower.pipeline import lower
from galvatron_fx.passes.lower.stage import CheckpointedLayer, cut_specs, stage_layer_indices
from galvatron_fx.plan import LayerStrategy, Plan


@functools.lru_cache(maxsize=None)
def captured(name: str, batch: int = 2):
    torch.manual_seed(0)
    model, kwargs = build_model(name, batch=batch, seq=16)
    return galvatron_fx.capture(model, example_kwargs=kwargs), kwargs


def plan_for(program, world_size=2, pp=2, dp_types=("ddp",), ckpt=(False,), chunks=2, **kw):
    n = len(program.body)
    dp = world_size // pp
    layers = tuple(
        LayerStrategy(dp=dp, dp_type=dp_types[i % len(dp_types)], ckpt=ckpt[i % len(ckpt)]) for i in range(n)
    )
    return Plan(
        world_size=world_size, layers=layers, pp=pp, chunks=chunks, global_batch=chunks * dp * program.batch_size, **kw
    )


def test_pipeline_split_follows_pp_division_and_layer_table():
    program, _ = captured("gpt2")
    plan = plan_for(program, pp=2, pp_division=(1, 3))
    first, last = lower(program, plan, 0), lower(program, plan, 1)
    assert [item.index for item in first.stage_layers] == [0, 1]  # prologue + first block
    assert [item.index for item in last.stage_layers] == [2, 3, 4, 5]  # three blocks + epilogue
    sent = {spec.name for spec in first.send_specs}
    assert sent == {spec.name for spec in program.layers[1].boundary_out}  # the hidden state
    assert first.send_specs == last.recv_specs and not first.recv_specs and not last.send_specs
    assert first.loss_name is None and last.loss_name == "cross_entropy_loss"
    assert first.batch_names == ("input_ids",) and last.batch_names == ("labels",)
    # the tied weight is on both stages, as a copy: lowering never shares tensors with the Program
    program_weight = dict(program.graph_module.named_parameters(remove_duplicate=False))["lm_head.weight"]
    ours = first.user_parameters()["lm_head.weight"], last.user_parameters()["lm_head.weight"]
    assert ours[0] is not ours[1] and all(p is not program_weight for p in ours)
    assert all(torch.equal(p, program_weight) for p in ours)


def test_t5_pipeline_cut_between_encoder_and_decoder():
    program, _ = captured("t5")
    plan = plan_for(program, pp=2)
    stage_modules = [program.layers[i].module_path for i in stage_layer_indices(program, plan, 1)]
    assert all("encoder" not in path for path in stage_modules) and any("decoder" in path for path in stage_modules)
    assert "encoder" in program.layers[stage_layer_indices(program, plan, 0)[1]].module_path
    # the encoder's output crosses the cut, values read only by the model's outputs do not
    names = {spec.name for spec in cut_specs(program, plan, 0)}
    assert names and names <= {
        spec.name for spec in program.layers[stage_layer_indices(program, plan, 0)[-1]].boundary_out
    }
    assert not any(
        spec.name in program.output_names
        and spec.name
        not in {n for layer in program.layers[stage_layer_indices(program, plan, 1)[0] :] for n in layer.input_names}
        for spec in cut_specs(program, plan, 0)
    )


def test_stage_runs_like_the_program_layers():
    from galvatron_fx.program import run_layer

    program, kwargs = captured("llama")
    plan = plan_for(program, world_size=1, pp=1, chunks=1)
    stage = lower(program, plan, 0)
    env = program.flatten_inputs((), kwargs)
    (got,) = stage(dict(env), seed=None)
    for layer in program.layers:
        run_layer(layer, env)
    assert torch.allclose(got, env[stage.loss_name], atol=1e-6)


def test_seeded_dropout_repeats_without_torch_manual_seed(monkeypatch):
    torch.manual_seed(0)
    model, kwargs = build_model("gpt2", batch=2, seq=16)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    program = galvatron_fx.capture(model, example_kwargs=kwargs)
    stage = lower(program, plan_for(program, world_size=1, pp=1, chunks=1), 0)
    env = program.flatten_inputs((), kwargs)
    # each layer seeds the generators it draws from; torch.manual_seed would also queue a seed, with a
    # formatted stack trace, for every accelerator type (a cost paid per layer and micro-batch)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("the stage called torch.manual_seed"))
    first, again, other = (stage(dict(env), seed=seed)[0] for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_checkpointing_wraps_marked_layers_only_and_prints_readably(tmp_path):
    program, _ = captured("bert")
    plan = plan_for(program, pp=2, ckpt=(True, False), dp_types=("ddp", "zero3"))
    stage = lower(program, plan, 0)
    body = [item for item in stage.stage_layers if item.kind == "block"]
    wrapped = [isinstance(stage.layers[item.name], CheckpointedLayer) for item in body]
    assert wrapped == [item.strategy.ckpt for item in body] and any(wrapped) and not all(wrapped)
    text = repr(stage)
    assert "stage 0/2" in text and "BertLayer" in text and "ckpt" in text and "send " in text
    files = stage.dump(tmp_path)
    assert (tmp_path / "stage.txt").read_text().startswith("stage 0/2")
    assert len(files) == 1 + len(stage.stage_layers)
    assert "def forward" in (tmp_path / f"{body[0].name}.py").read_text()


def _batched_input_sizes(stage) -> set[int]:
    from galvatron_fx.passes.lower.stage import unwrap
    from galvatron_fx.program import node_meta

    return {
        int(node.meta["val"].shape[0])
        for layer in stage.stage_layers
        for node in unwrap(stage.layers[layer.name]).graph.find_nodes(op="placeholder")
        if node_meta(node).batched
    }


@pytest.mark.parametrize("global_batch", [2, 8, 16])
def test_one_capture_lowers_at_any_micro_batch(global_batch):
    program, _ = captured("gpt2")  # captured with 2 samples; the batch is a symbol
    plan = plan_for(program, world_size=2, pp=1, chunks=1)
    other = Plan(world_size=2, layers=plan.layers, chunks=1, global_batch=global_batch)
    stage = lower(program, other, 0)
    assert _batched_input_sizes(stage) == {global_batch // 2}  # 1, 4 and 8 samples per rank


class _BranchesOnBatch(torch.nn.Module):
    """A model whose forward tests the batch size: it can only be captured at one batch."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, y):
        if x.shape[0] == 2:
            x = x * 1.0
        for block in self.blocks:
            x = block(x)
        return torch.nn.functional.mse_loss(x, y)


def test_a_model_captured_at_a_fixed_batch_is_refused_at_another():
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="could not be captured with a symbolic batch"):
        program = galvatron_fx.capture(_BranchesOnBatch(), (x, x))
    assert not program.dynamic_batch
    fits = Plan(world_size=2, layers=(LayerStrategy(dp=2),) * 2, global_batch=4)
    assert _batched_input_sizes(lower(program, fits, 0)) == {2}
    with pytest.raises(PlanError, match="captured at batch 2 only.*capture it at an example batch of 4"):
        lower(program, Plan(world_size=2, layers=fits.layers, global_batch=8), 0)


def test_rank_layout():
    plan = Plan(world_size=8, layers=(LayerStrategy(dp=2),) * 4, pp=4, global_batch=8)
    layouts = [ParallelDims.of(plan).position(r) for r in range(8)]
    assert [(item.stage, item.local) for item in layouts] == [(s, i) for s in range(4) for i in range(2)]
    assert layouts[5].rank_of(3) == 7 and layouts[0].is_first and layouts[7].is_last


def test_64_rank_groups_and_stages_under_fake_process_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from galvatron_fx.runtime import groups
    from galvatron_fx.runtime.data_parallel import apply_data_parallel, prepare_groups

    program, _ = captured("gpt2")  # 4 body layers, micro-batch 2
    types = (("ddp", False), ("zero2", False), ("zero3", False), ("zero3", True))
    plan = Plan(
        world_size=64,
        layers=tuple(LayerStrategy(dp=16, dp_type=t, ckpt=c) for t, c in types),
        pp=4,
        chunks=2,
        global_batch=64,
        pipeline="1f1b",
    )
    expected_layers = {0: [0, 1], 1: [2], 2: [3], 3: [4, 5]}
    for rank in range(64):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=64)
        try:
            groups.clear_cache()
            prepare_groups(program, plan)
            stage_index, local = divmod(rank, 16)
            mesh = groups.world_mesh(plan)
            assert groups.world_group_ranks(mesh["dp"]) == list(range(stage_index * 16, stage_index * 16 + 16))
            assert groups.world_group_ranks(mesh["pp"]) == [s * 16 + local for s in range(4)]
            tied = groups.tied_group(plan, (0, 3), local)
            if stage_index in (0, 3):  # the tied embedding/head lives on the first and last stage
                assert dist.get_process_group_ranks(tied) == [local, 48 + local]
            else:
                assert tied == dist.GroupMember.NON_GROUP_MEMBER
            created = list(groups.CREATED)
            stage = lower(program, plan, rank)
            sync = apply_data_parallel(stage, program, plan)
            assert groups.CREATED == created and len(set(created)) == len(created)  # nothing created twice
            assert [item.index for item in stage.stage_layers] == expected_layers[stage_index]
            strategy = plan.layers[stage_index]
            assert stage.micro_batch == 2
            assert (len(stage.recv_specs) > 0) == (stage_index > 0) and (len(stage.send_specs) > 0) == (stage_index < 3)
            zero_units = [
                item for item in stage.stage_layers if item.kind == "block" and item.strategy.dp_type != "ddp"
            ]
            assert len(sync.fsdp_units) == len(zero_units)  # prologue and epilogue follow the default (ddp)
            assert [w.name for w in sync.tied] == (["lm_head.weight"] if stage_index in (0, 3) else [])
            block = next(item for item in stage.stage_layers if item.kind == "block")
            assert block.strategy == strategy
            assert isinstance(stage.layers[block.name], CheckpointedLayer) == strategy.ckpt
            if strategy.dp_type != "ddp":  # sharded over the 16 ranks of the stage
                param = next(iter(stage.layers[block.name].parameters()))
                assert param.device_mesh.mesh.tolist() == list(range(stage_index * 16, stage_index * 16 + 16))
                assert param.to_local().shape[0] * 16 >= param.shape[0]
        finally:
            dist.destroy_process_group()
            groups.clear_cache()
