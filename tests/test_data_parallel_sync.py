"""Gradient synchronisation inside the backward pass: DDP buckets start their all-reduce during the last
micro-batch's backward (not after it), and a stage's ZeRO layers share one FSDP2 root."""

from __future__ import annotations

import torch

from distributed import GLOBAL_BATCH, _program


def _sync_timeline_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from galvatron_fx.plan import LayerStrategy, Plan
    from galvatron_fx.runtime import Trainer

    program, batches = _program("gpt2", 2)
    kinds = ("ddp", "zero3", "ddp", "zero2")
    plan = Plan(world_size=2, layers=tuple(LayerStrategy(dp=2, dp_type=k) for k in kinds), chunks=2, global_batch=GLOBAL_BATCH)
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
    reduced = [p.grad.clone() for bucket in sync.buckets for p in bucket.params]
    return {rank: {"seen": seen, "after_finish": [b.in_flight for b in sync.buckets], "reduced": reduced,
                   "stage_is_root": isinstance(trainer.stage, FSDPModule),
                   "units": [isinstance(trainer.stage.layers[l.name], FSDPModule) for l in trainer.stage.stage_layers]}}


def test_ddp_buckets_all_reduce_during_the_last_backward_and_zero_layers_share_one_root():
    from galvatron_fx.runtime import spawn

    ranks = spawn(_sync_timeline_worker, 2, timeout_s=300.0)
    results = [r[i] for i, r in enumerate(ranks)]
    for result in results:
        # layers: prologue, 4 blocks, epilogue; buckets: prologue, ddp blocks 0 and 2, epilogue (tied weight's bucket)
        assert len(result["seen"]) == 2 and len(result["seen"][0]) == 4
        assert not any(result["seen"][0])  # the first micro-batch only accumulates
        assert all(result["seen"][1])  # every bucket's all-reduce started inside the last backward
        assert not any(result["after_finish"])
        assert result["stage_is_root"] and result["units"] == [False, False, True, False, True, False]
    for a, b in zip(*(r["reduced"] for r in results)):  # both ranks hold the same averaged gradients
        assert torch.equal(a, b)
