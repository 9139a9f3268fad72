"""Runtime overhead: our lowered program against the torch-native equivalent written by hand.

Same model (LLaMA-style, benchmarks/common.py), same initial weights, same data, same strategy; both
built in one process launch and timed in alternating rounds (ours first in even rounds, native first in
odd ones, so drift in the machine's load hits both alike). Reported: median step time of each, the ratio
ours / native (target ≤ 1.05: the median over rounds of the round's ratio, ``paired_ratio``; the ratio of
the pooled medians next to it), throughput and MFU, and the first step's loss of each (equal weights and
data must give equal losses: the check that the two run the same computation).

Equivalents (benchmarks/native.py): ``ddp`` uniform DDP ↔ DistributedDataParallel; ``fsdp`` uniform
ZeRO-3 with the embedding/head sharded too ↔ FSDP2 fully_shard per layer + root; ``tp`` uniform tensor
parallelism ↔ DTensor parallelize_module (our embedding and head run data-parallel on the stage's ranks,
the native ones replicated on the whole batch: our lowering has no replicated-head mode); ``pp`` one
stage per rank, 1F1B ↔ torch.distributed.pipelining Schedule1F1B.

    python benchmarks/runtime_overhead.py                  # 2 processes, all four strategies
    python benchmarks/runtime_overhead.py --world 4
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    RESULTS,
    SHAPES,
    build_model,
    command_line,
    device_peak_flops,
    median,
    mfu,
    model_flops_per_sample,
    print_table,
    spawn,
    time_steps,
    write_json,
)
from benchmarks.native import STRATEGIES, NativeConfig, NativeRunner
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan

GLOBAL_BATCH = 8
MODEL = "llama"


def our_plan(strategy: str, world: int, layers: int, chunks: int) -> Plan:
    """The plan that does what the native ``strategy`` does."""
    if strategy == "pp":
        return Plan(
            world_size=world,
            layers=(LayerStrategy(),) * layers,
            pp=world,
            chunks=chunks,
            pipeline="1f1b",
            global_batch=GLOBAL_BATCH,
        )
    if strategy == "tp":
        return Plan(world_size=world, layers=(LayerStrategy(tp=world),) * layers, global_batch=GLOBAL_BATCH)
    dp_type = "zero3" if strategy == "fsdp" else "ddp"
    return Plan(
        world_size=world,
        layers=(LayerStrategy(dp=world, dp_type=dp_type),) * layers,
        global_batch=GLOBAL_BATCH,
        embedding=EmbeddingStrategy(embed_sdp=strategy == "fsdp"),
    )


def native_chunks(strategy: str, chunks: int) -> int:
    return chunks if strategy == "pp" else 1


def compare(
    rank: int, world: int, shape: str, strategies: list[str], chunks: int, warmup: int, rounds: int, steps: int
) -> dict:
    """Spawned worker: for each strategy build ours and native, warm both up, time alternating rounds."""
    from galvatron_fx import capture
    from galvatron_fx.passes.lower.stage import local_micro_batch
    from galvatron_fx.runtime import Trainer, groups

    warnings.simplefilter("ignore")
    device = groups.current_device()
    out = {}
    for strategy in strategies:
        model, batch = build_model(MODEL, shape, GLOBAL_BATCH)
        plan = our_plan(strategy, world, model.config.num_hidden_layers, chunks)
        local = local_micro_batch(plan)
        model = model.to(device)
        example = {k: v[:local].to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        trainer = Trainer(capture(model, example_kwargs=example), plan, device=device)
        native_model, _ = build_model(MODEL, shape, GLOBAL_BATCH)
        native = NativeRunner(native_model, NativeConfig(strategy, world, native_chunks(strategy, chunks)), device)
        run = {"ours": lambda: trainer.step(batch), "native": lambda: native.step(batch)}
        first_loss = {name: fn() for name, fn in run.items()}  # the same weights and data: the same loss
        for fn in run.values():
            time_steps(fn, device, max(warmup - 1, 0), 0)
        times: dict[str, list[float]] = {"ours": [], "native": []}
        for r in range(rounds):
            for name in ("ours", "native") if r % 2 == 0 else ("native", "ours"):
                times[name] += time_steps(run[name], device, 0, steps)
        out[strategy] = {"times_s": times, "first_loss": first_loss, "describe": trainer.describe()}
        trainer = native = run = None  # this strategy's state goes before the next one's is built
        gc.collect()
    return out


def paired_ratio(ours: list[list[float]], native: list[list[float]], steps: int) -> float:
    """The median over rounds of ours / native within the round, each the slowest rank's median of the
    round's ``steps`` steps (``ours``, ``native``: step times per rank, round after round). The two sides of a
    round run seconds apart; the machine's speed drifts by more than the difference over a run, which makes
    the pooled step times two-humped and the ratio of their medians jump with how the humps split."""

    def round_s(per_rank: list[list[float]], r: int) -> float:
        return max(median(times[r * steps : (r + 1) * steps]) for times in per_rank)

    rounds = len(ours[0]) // steps
    return median([round_s(ours, r) / round_s(native, r) for r in range(rounds)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--chunks", type=int, default=4, help="micro-batches of the pipeline runs")
    parser.add_argument("--warmup", type=int, default=2)
    # one step a side per round: the two steps of a pair run a fraction of a second apart, so the machine's
    # drift (more than the difference measured, over a run) moves both alike; 30 pairs
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per round and side")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    from galvatron_fx import capture
    from galvatron_fx.cost.model_profile import ModelProfile

    strategies = args.strategies.split(",")
    per_rank = spawn(compare, args.world, args.shape, strategies, args.chunks, args.warmup, args.rounds, args.steps)
    model, batch = build_model(MODEL, args.shape, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops_per_step = (
            model_flops_per_sample(ModelProfile.from_program(capture(model, example_kwargs=batch), flops_per_s=1.0))
            * GLOBAL_BATCH
        )
    peak_flops, peak_source = device_peak_flops()
    rows = []
    for strategy in strategies:
        # the slowest rank's median counts (the step ends with a world all-reduce: ranks agree closely)
        ours = max(median(r[strategy]["times_s"]["ours"]) for r in per_rank)
        native = max(median(r[strategy]["times_s"]["native"]) for r in per_rank)
        ratio = paired_ratio(
            [r[strategy]["times_s"]["ours"] for r in per_rank],
            [r[strategy]["times_s"]["native"] for r in per_rank],
            args.steps,
        )
        losses = per_rank[0][strategy]["first_loss"]
        rows.append(
            {
                "strategy": strategy,
                "world": args.world,
                "ours_ms": ours * 1e3,
                "native_ms": native * 1e3,
                "ratio": ratio,
                "ratio_of_medians": ours / native,
                "meets_target": ratio <= 1.05,
                "ours_samples_per_s": GLOBAL_BATCH / ours,
                "native_samples_per_s": GLOBAL_BATCH / native,
                "ours_mfu_pct": 100 * mfu(flops_per_step, ours, args.world, peak_flops),
                "native_mfu_pct": 100 * mfu(flops_per_step, native, args.world, peak_flops),
                "first_loss_ours": losses["ours"],
                "first_loss_native": losses["native"],
                "times_s": {name: [r[strategy]["times_s"][name] for r in per_rank] for name in ("ours", "native")},
                "ours_describe": per_rank[0][strategy]["describe"],
            }
        )
    table = print_table(
        rows,
        [
            ("strategy", "strategy", ""),
            ("world", "procs", ""),
            ("ours_ms", "ours ms", ".1f"),
            ("native_ms", "native ms", ".1f"),
            ("ratio", "ours/native", ".3f"),
            ("meets_target", "≤ 1.05", ""),
            ("ratio_of_medians", "ratio of medians", ".3f"),
            ("ours_samples_per_s", "ours samples/s", ".1f"),
            ("ours_mfu_pct", "ours MFU %", ".2f"),
            ("native_mfu_pct", "native MFU %", ".2f"),
            ("first_loss_ours", "loss ours", ".4f"),
            ("first_loss_native", "loss native", ".4f"),
        ],
    )
    payload = {
        "command": command_line(),
        "model": MODEL,
        "shape": SHAPES[args.shape],
        "global_batch": GLOBAL_BATCH,
        "chunks": args.chunks,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "peak_flops_per_device": peak_flops,
        "peak_source": peak_source,
        "flops_per_step": flops_per_step,
        "rows": rows,
        "table": table,
    }
    path = write_json(f"runtime_overhead_w{args.world}", payload, Path(args.out))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
