"""Gradient synchronisation inside the backward pass: DDP buckets start their all-reduce during the last
micro-batch's backward (not after it), gradients live in the buckets, buckets span consecutive layers of
one group up to their cap, and a stage's ZeRO layers share one FSDP2 root."""

from __future__ import annotations

import torch
from distributed import GLOBAL_BATCH, _program


def _sync_timeline_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan
    from galvatron_fx.runtime import Trainer

    program, batches = _program("gpt2", 2)
    kinds = ("ddp", "zero3", "ddp", "zero2")
    plan = Plan(
        world_size=2,
        layers=tuple(LayerStrategy(dp=2, dp_type=k) for k in kinds),
        chunks=2,
        global_batch=GLOBAL_BATCH,
        embedding=EmbeddingStrategy(embed_sdp=True),
    )
    trainer = Trainer(program, plan)
    sync, executor = trainer.sync, trainer.executor
    seen = []  # per backward: which buckets were in flight right after it
    original = sync.after_backward

    def after_backward(last: bool) -> None:
        seen.append([bucket.in_flight for bucket in sync.buckets])
        original(last)

    sync.after_backward = after_backward
    executor.run(trainer.actions, trainer.micro_batches(batches[0]), trainer._seeds())
    sync.finish()
    ends = [
        trainer.stage.layers[item.name] for item in trainer.stage.stage_layers if item.kind in ("prologue", "epilogue")
    ]
    tied_name = next(
        n for n, p in ends[0].named_parameters() if p.dim() == 2 and any(p is q for q in ends[1].parameters())
    )
    reduced = [p.grad.clone() for bucket in sync.buckets for p in bucket.params]
    views = all(
        bucket.flat.data_ptr() <= p.grad.data_ptr() < bucket.flat.data_ptr() + bucket.flat.nbytes
        for bucket in sync.buckets
        for p in bucket.params
    )
    return {
        rank: {
            "seen": seen,
            "views": views,
            "buffers": len(sync.grad_buffers()),
            "after_finish": [b.in_flight for b in sync.buckets],
            "reduced": reduced,
            "stage_is_root": isinstance(trainer.stage, FSDPModule),
            "units": [isinstance(trainer.stage.layers[item.name], FSDPModule) for item in trainer.stage.stage_layers],
            "ends_share_a_unit": ends[0]._get_fsdp_state() is ends[1]._get_fsdp_state(),
            "tied_weight_sharded": isinstance(ends[0].get_parameter(tied_name), DTensor),
        }
    }


def test_ddp_buckets_all_reduce_during_the_last_backward_and_zero_layers_share_one_root():
    from galvatron_fx.runtime import spawn

    ranks = spawn(_sync_timeline_worker, 2, timeout_s=300.0)
    results = [r[i] for i, r in enumerate(ranks)]
    for result in results:
        # replicated: ddp blocks 0 and 2, on one group and far below the cap: one bucket, whose buffer holds
        # the gradients; the embedding and head (sharing GPT-2's tied weight) are one FSDP2 unit
        assert len(result["seen"]) == 2 and len(result["seen"][0]) == 1
        assert result["views"] and result["buffers"] == 1
        assert not any(result["seen"][0])  # the first micro-batch only accumulates
        assert all(result["seen"][1])  # every bucket's all-reduce started inside the last backward
        assert not any(result["after_finish"])
        assert result["stage_is_root"] and result["units"] == [True, False, True, False, True, True]
        assert result["ends_share_a_unit"] and result["tied_weight_sharded"]
    for a, b in zip(*(r["reduced"] for r in results)):  # both ranks hold the same averaged gradients
        assert torch.equal(a, b)


def test_buckets_span_consecutive_layers_of_one_group_up_to_the_cap():
    from galvatron_fx.runtime.data_parallel import bucket_layers

    group_a, group_b = object(), object()  # groups are told apart by identity
    layer = lambda group, *sizes: (group, 2, [torch.nn.Parameter(torch.zeros(n)) for n in sizes])  # noqa: E731
    layers = [layer(group_a, 10), layer(group_a, 20, 5), layer(group_b, 30), layer(group_a, 40), layer(group_a, 50)]
    buckets = bucket_layers(layers, cap_bytes=4 * 60)
    # filled in backward order: the last two layers exceed the cap together; the group changes at layer 2
    assert [[p.numel() for p in b.params] for b in buckets] == [[50], [40], [30], [20, 5, 10]]
    assert [b.group for b in buckets] == [group_a, group_a, group_b, group_a]
    assert bucket_layers([layer(group_a, 100)], cap_bytes=4)[0].nbytes == 400  # a layer above the cap: its own bucket


def _mixed_kinds_worker(rank: int, world_size: int) -> dict:
    from distributed import ADAM_EPS, LR, _config
    from torch.distributed.tensor import DTensor

    from galvatron_fx.plan import LayerStrategy, Plan
    from galvatron_fx.runtime import Trainer

    program, batches = _program("gpt2")
    kinds = ("zero3", "ddp", "zero3", "zero2")  # ZeRO layers hold DTensors; the tied embedding and head plain tensors
    plan = Plan(world_size=2, layers=tuple(LayerStrategy(dp=2, dp_type=k) for k in kinds), global_batch=GLOBAL_BATCH)
    trainer = Trainer(
        program,
        plan,
        config=_config(),
        optimizer=lambda groups: torch.optim.Adam(groups, lr=LR, eps=ADAM_EPS, foreach=True),
    )
    kinds_per_group = [{isinstance(p, DTensor) for p in group["params"]} for group in trainer.optimizer.param_groups]
    return {"kinds": kinds_per_group, "losses": [float(trainer.step(batch)) for batch in batches]}


def test_one_optimizer_takes_every_parameter_kind_on_its_foreach_path():
    """``foreach`` (the default on CUDA) refuses a list mixing DTensors and plain tensors: the trainer gives
    the optimizer one parameter group per kind."""
    from distributed import TOLERANCE, eager_reference

    from galvatron_fx.runtime import spawn

    reference, _ = eager_reference("gpt2")
    for result in spawn(_mixed_kinds_worker, 2, timeout_s=300):
        assert sorted(map(sorted, result["kinds"])) == [[False], [True]]
        assert max(abs(a - b) for a, b in zip(result["losses"], reference)) <= TOLERANCE
