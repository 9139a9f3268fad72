"""Training controls against single-process eager training: the global gradient norm and clipping by it,
learning-rate schedules, weight-decay groups, evaluation without dropout, and each rank reading only its share
of the data (``compiled.data_loader``).

One group of 4 ranks trains GPT-2 (head dim 16, sequence 12) under each plan of ``CASES``; every rank feeds
its local share through ``data_loader`` over a dataset whose global order the test replays for the eager
reference. SGD makes a wrong averaging factor visible (Adam normalises it away); clipping is set below the
gradient norm, so every step clips.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import galvatron_fx
from galvatron_fx.data.sampler import GlobalOrder, StepBlocks
from galvatron_fx.models import build_model, example_batch
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan
from galvatron_fx.runtime import LRSchedule, spawn, weight_decay_groups

WORLD, GLOBAL_BATCH, SEQ, STEPS, SAMPLES = 4, 8, 12, 4, 20
CLIP = 0.5
SCHEDULE = LRSchedule("cosine", warmup_steps=2, total_steps=STEPS, min_lr_ratio=0.1)


class _Samples(torch.utils.data.Dataset):
    """``SAMPLES`` GPT-2 samples (input_ids, labels), one per index."""

    def __init__(self):
        model, _ = build_model("gpt2")
        batch = example_batch("gpt2", model, SAMPLES, SEQ, seed=7)
        self.input_ids, self.labels = batch["input_ids"], batch["labels"]

    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.labels[index], "index": index}


def _heterogeneous() -> Plan:
    layers = (
        LayerStrategy(tp=2, dp=1),
        LayerStrategy(dp=2, dp_type="zero3"),
        LayerStrategy(tp=2, dp=1, sp="megatron"),
        LayerStrategy(dp=2, dp_type="ddp", ckpt=True),
    )
    return Plan(
        world_size=WORLD, layers=layers, pp=2, chunks=2, global_batch=GLOBAL_BATCH, embedding=EmbeddingStrategy()
    )


# name → (plan, optimizer: "sgd" | "adam" | "adamw+cosine", clip)
CASES = {
    "dp4+sgd": (galvatron_fx.uniform_plan(), "sgd", CLIP),
    "pp2_dp2+sgd": (galvatron_fx.uniform_plan(pp=2, chunks=2), "sgd", CLIP),
    "tp2_dp2+sgd": (galvatron_fx.uniform_plan(tp=2), "sgd", CLIP),
    "zero3+sgd": (galvatron_fx.uniform_plan(sdp=True), "sgd", CLIP),
    "heterogeneous+sgd": (_heterogeneous(), "sgd", CLIP),
    "tp2_dp2+adam": (galvatron_fx.uniform_plan(tp=2), "adam", CLIP),
    "pp2_tp2+adamw_cosine": (galvatron_fx.uniform_plan(pp=2, tp=2, chunks=2), "adamw+cosine", None),
}
FAST = ("pp2_dp2+sgd", "tp2_dp2+adam", "heterogeneous+sgd")


def _optimizer(kind: str):
    if kind == "sgd":
        return lambda groups: torch.optim.SGD(groups, lr=0.1)
    if kind == "adam":
        return lambda groups: torch.optim.Adam(groups, lr=1e-3, eps=1e-6)
    return lambda groups: torch.optim.AdamW(weight_decay_groups(groups, 0.1), lr=1e-2, eps=1e-6)


def _worker(rank: int, world: int, names: list[str]) -> dict:
    dataset = _Samples()
    out = {}
    for name in names:
        plan, kind, clip = CASES[name]
        torch.manual_seed(0)
        model, _ = build_model("gpt2")
        first = {"input_ids": dataset.input_ids[:GLOBAL_BATCH], "labels": dataset.labels[:GLOBAL_BATCH]}
        compiled = galvatron_fx.compile(
            model,
            example_kwargs={**first, "use_cache": False},
            plan=plan,
            optimizer=_optimizer(kind),
            clip_grad_norm=clip,
            lr_schedule=SCHEDULE if "cosine" in kind else None,
        )
        losses, norms, lrs, seen = [], [], [], []
        for batch in compiled.data_loader(dataset, seed=3, stop_step=STEPS):
            seen.append(batch.pop("index").tolist())
            loss = compiled.train_step(batch)  # left on the device: no step waits for it
            assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
            losses.append(float(loss))
            norms.append(float(compiled.trainer.last_grad_norm))
            lrs.append(compiled.trainer.last_lr)
        full = compiled.trainer.full_parameters()  # collective over the stage: every rank calls it
        full = full if compiled.trainer.stage.position.local == 0 else {}
        out[name] = {
            "losses": losses,
            "norms": norms,
            "lrs": lrs,
            "seen": seen,
            "data_index": compiled.trainer.data_index,
            "stage": compiled.trainer.stage.position.stage,
            "params": full,
        }
    return out


@functools.lru_cache(maxsize=None)
def _run(names: tuple[str, ...]) -> list[dict]:
    return spawn(_worker, WORLD, list(names), timeout_s=1200)


@functools.lru_cache(maxsize=None)
def _eager(kind: str, clip: float | None) -> dict:
    dataset = _Samples()
    torch.manual_seed(0)
    model, _ = build_model("gpt2")
    named = [{"params": list(model.named_parameters())}]
    optimizer = _optimizer(kind)(named)
    scheduler = None
    if "cosine" in kind:
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / SCHEDULE.warmup_steps, total_iters=SCHEDULE.warmup_steps - 1
        )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=STEPS - SCHEDULE.warmup_steps, eta_min=1e-2 * SCHEDULE.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], [SCHEDULE.warmup_steps])
    order = GlobalOrder(SAMPLES, GLOBAL_BATCH, seed=3)
    losses, norms, lrs, batches = [], [], [], []
    for step in range(STEPS):
        indices = order.batch(step)
        batches.append(indices)
        loss = model(input_ids=dataset.input_ids[indices], labels=dataset.labels[indices], use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        if scheduler:
            scheduler.step()
        losses.append(loss.item())
        norms.append(float(norm))
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return {"losses": losses, "norms": norms, "lrs": lrs, "batches": batches, "params": params}


def _check(name: str, results: list[dict]) -> None:
    _, kind, clip = CASES[name]
    eager = _eager(kind, clip)
    for rank, result in enumerate(results):
        got = result[name]
        assert max(abs(a - b) for a, b in zip(got["losses"], eager["losses"])) <= 1e-4, (name, rank, got, eager)
        assert all(abs(a - b) <= 1e-5 * b for a, b in zip(got["norms"], eager["norms"])), (name, got, eager)
        assert got["lrs"] == pytest.approx(eager["lrs"], rel=1e-12), (name, got["lrs"], eager["lrs"])
        for param_name, value in got["params"].items():
            assert torch.allclose(value, eager["params"][param_name], atol=1e-4), (name, param_name)
    if clip is not None:  # the test clips: the unclipped norm is above the threshold
        assert min(eager["norms"]) > clip
    # every sample of each global batch is read exactly once across a stage's ranks, in single-process order
    for stage in {r[name]["stage"] for r in results}:
        ranks = sorted((r[name] for r in results if r[name]["stage"] == stage), key=lambda r: r["data_index"])
        for step in range(STEPS):
            assert [i for r in ranks for i in r["seen"][step]] == eager["batches"][step]
    assert sum(1 for r in results if r[name]["params"]) >= 1


@pytest.mark.parametrize("name", FAST)
def test_clipping_schedules_and_local_shares_equal_eager(name):
    _check(name, _run(FAST))


@pytest.mark.full
@pytest.mark.parametrize("name", [n for n in CASES if n not in FAST])
def test_clipping_schedules_and_local_shares_equal_eager_full(name):
    _check(name, _run(tuple(n for n in CASES if n not in FAST)))


def test_lr_schedules_equal_torch_schedulers():
    for kind in ("cosine", "linear"):
        schedule = LRSchedule(kind, warmup_steps=3, total_steps=13, min_lr_ratio=0.2)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 3, total_iters=2)
        decay = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0.1)
            if kind == "cosine"
            else torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.2, total_iters=10)
        )
        torch_schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], [3])
        ours = []
        for step in range(13):
            ours.append(0.5 * schedule.factor(step))
            assert ours[-1] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), (kind, step)
            optimizer.step()
            torch_schedule.step()
    assert LRSchedule().factor(100) == 1.0
    assert [LRSchedule("constant", warmup_steps=4).factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_weight_decay_spares_biases_and_norms():
    model, _ = build_model("gpt2")
    groups = weight_decay_groups([{"params": list(model.named_parameters())}], 0.1)
    decayed = {n for g in groups if g["weight_decay"] for n, _ in g["params"]}
    spared = {n for g in groups if not g["weight_decay"] for n, _ in g["params"]}
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.wte.weight" in decayed
    assert "transformer.h.0.ln_1.weight" in spared and "transformer.h.0.attn.c_attn.bias" in spared
    assert not decayed & spared


def test_sampler_blocks_and_resume():
    order = GlobalOrder(23, 8, seed=1)
    assert order.steps_per_epoch == 2
    epoch = [i for step in range(2) for i in order.batch(step)]
    assert len(set(epoch)) == 16  # no sample twice in an epoch; the remainder of 7 is dropped
    assert order.batch(2) != order.batch(0)  # the next epoch is another permutation
    for step in range(5):
        assert [i for d in range(4) for i in order.block(step, d, 4)] == order.batch(step)
    whole = list(StepBlocks(order, 1, 2, start_step=0, stop_step=6))
    resumed = list(StepBlocks(order, 1, 2, start_step=3, stop_step=6))
    assert resumed == whole[3:]
    assert GlobalOrder(10, 4, shuffle=False).batch(1) == [4, 5, 6, 7]
    with pytest.raises(galvatron_fx.GalvatronError, match="fewer than one global batch"):
        GlobalOrder(3, 4)
