"""Step time of our runtime by variant: eager against compiled layers, fp32 against bf16, per strategy.

For each strategy (``runtime_overhead.our_plan``: uniform DDP, ZeRO-3 with the embedding sharded, TP, a
one-stage-per-rank 1F1B pipeline) four trainers of one LLaMA-style model, same weights and data, are built
in one launch: fp32 eager, fp32 with ``compile_layers``, bf16 eager, bf16 compiled. After a warm-up (which
includes inductor's compilation) they are timed in rounds, the order rotating each round so that drift in
the machine's load hits all alike. Reported per strategy: each variant's median step, and the paired ratios
compiled / eager (fp32 and bf16) and bf16 / fp32 (eager and compiled): the median over rounds of the
round's ratio (``runtime_overhead.paired_ratio``).

On CPU these ratios describe this machine only: bf16 matmuls without matrix extensions are slower than
fp32, and inductor's CPU code is not what it emits for GPUs. ``benchmarks/gpu_check.py`` measures the GPU
figures.

    python benchmarks/precision_and_compile.py              # 2 processes, all four strategies
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
    median,
    print_table,
    spawn,
    time_steps,
    write_json,
)
from benchmarks.native import STRATEGIES
from benchmarks.runtime_overhead import GLOBAL_BATCH, MODEL, our_plan, paired_ratio

VARIANTS = {  # name → (mixed precision, compile_layers)
    "fp32": ("fp32", False),
    "fp32 compiled": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16 compiled": ("bf16", True),
}
RATIOS = (
    ("compiled/eager fp32", "fp32 compiled", "fp32"),
    ("compiled/eager bf16", "bf16 compiled", "bf16"),
    ("bf16/fp32 eager", "bf16", "fp32"),
    ("bf16/fp32 compiled", "bf16 compiled", "fp32 compiled"),
)


def measure(rank: int, world: int, shape: str, strategies: list[str], chunks: int, warmup: int, rounds: int) -> dict:
    """Spawned worker: per strategy the four variants' step times, round after round, and first losses."""
    from galvatron_fx import capture
    from galvatron_fx.passes.lower.stage import local_micro_batch
    from galvatron_fx.runtime import TrainConfig, Trainer, groups

    warnings.simplefilter("ignore")
    device = groups.current_device()
    out = {}
    for strategy in strategies:
        model, batch = build_model(MODEL, shape, GLOBAL_BATCH)
        plan = our_plan(strategy, world, model.config.num_hidden_layers, chunks)
        local = local_micro_batch(plan)
        example = {k: v[:local] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        program = capture(model, example_kwargs=example)
        trainers = {
            name: Trainer(program, plan, config=TrainConfig(mixed_precision=mp, compile_layers=compiled), device=device)
            for name, (mp, compiled) in VARIANTS.items()
        }
        run = {name: (lambda t=trainer: t.step(batch)) for name, trainer in trainers.items()}
        first_loss = {name: fn() for name, fn in run.items()}
        for fn in run.values():
            time_steps(fn, device, max(warmup - 1, 0), 0)
        names, times = list(run), {name: [] for name in run}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name] += time_steps(run[name], device, 0, 1)
        out[strategy] = {"times_s": times, "first_loss": first_loss}
        trainers = run = None
        gc.collect()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--chunks", type=int, default=2, help="micro-batches of the pipeline runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    per_rank = spawn(measure, args.world, args.shape, strategies, args.chunks, args.warmup, args.rounds, timeout_s=3600)
    rows = []
    for strategy in strategies:
        times = {name: [rank[strategy]["times_s"][name] for rank in per_rank] for name in VARIANTS}
        row = {"strategy": strategy, "procs": args.world}
        for name in VARIANTS:
            row[name] = max(median(t) for t in times[name]) * 1e3
        for label, a, b in RATIOS:
            row[label] = paired_ratio(times[a], times[b], 1)
        row["first losses"] = per_rank[0][strategy]["first_loss"]
        rows.append(row)
    columns = [("strategy", "strategy", "s"), ("procs", "procs", "d")]
    columns += [(name, f"{name} ms", ".1f") for name in VARIANTS] + [(label, label, ".3f") for label, _, _ in RATIOS]
    print_table(rows, columns)
    data = {"command": command_line(), "rounds": args.rounds, "rows": rows}
    write_json(f"precision_and_compile_w{args.world}", data, Path(args.out))
    return data


if __name__ == "__main__":
    main()
