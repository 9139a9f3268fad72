"""Plan quality: the searched plan against every feasible uniform plan and the torch-native baselines.

On one model (LLaMA-style, benchmarks/common.py) and one set of processes: measure every uniform plan of
the pp × tp × dp grid with DDP / ZeRO-2 / ZeRO-3 and with and without checkpointing (pipelines with
``pp`` and ``2·pp`` micro-batches), the plan ``passes.search.search`` picks from the measured profiles
(benchmarks/results/hardware_profile_<N>.json and the model's measured layer profile), and the native
runners of benchmarks/native.py, all in one process launch. Then, in a second launch, the searched plan,
the best measured plan and the best native baseline side by side: stepped in alternation, round after
round, so that the machine's drifts (15 % and more within one launch here) hit all three alike; the
targets are judged on these: searched throughput ≥ 0.95 × the best measured plan, and ≥ the best native
baseline.

The search space is what the runtime executes (no sequence parallelism, no vocab TP) and micro-batches
of at least 2 samples per rank (the shapes the committed figures were measured at): one search per
pipeline degree with the chunk counts that keep that, the best prediction wins.

    python benchmarks/plan_quality.py               # 4 processes
    python benchmarks/plan_quality.py --reprofile   # measure the hardware and the model's layers again first
    python benchmarks/plan_quality.py --world 2
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
from benchmarks.measure_plans import Trainers, run_plans
from benchmarks.native import STRATEGIES, NativeConfig, NativeRunner
from benchmarks.profiles import hardware_profile, model_profile
from galvatron_fx.plan import LayerStrategy, Plan

MODEL = "llama"
MIN_LOCAL_BATCH = 2


def _divisors(n: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= n and n % d == 0]


def uniform_grid(world: int, layers: int, global_batch: int, full: bool = False) -> list[tuple[str, Plan]]:
    """Every uniform plan whose micro-batches give each rank at least MIN_LOCAL_BATCH samples. ``full``: the
    whole uniform space the search considers (``searched_plan``): GPipe as well as 1F1B, strided TP groups
    as well as consecutive ones, every chunk count; otherwise 1F1B, consecutive TP and ``pp`` or ``2·pp``
    micro-batches."""
    out = []
    for pp in [d for d in _divisors(world) if d <= layers]:
        devices = world // pp
        for tp in _divisors(devices):
            dp = devices // tp
            for dp_type in ("ddp", "zero2", "zero3") if dp > 1 else ("ddp",):
                for ckpt in (False, True):
                    all_chunks = _divisors(global_batch) if full else ((1,) if pp == 1 else (pp, 2 * pp))
                    for chunks in all_chunks:
                        if global_batch % chunks or global_batch // chunks // devices < MIN_LOCAL_BATCH:
                            continue
                        for pipeline in ("1f1b", "gpipe") if full and pp > 1 else ("1f1b",):
                            for consecutive in (True, False) if full and 1 < tp < world and dp > 1 else (True,):
                                layer = LayerStrategy(
                                    tp=tp, dp=dp, dp_type=dp_type, ckpt=ckpt, tp_consecutive=consecutive
                                )
                                name = (
                                    f"pp{pp} tp{tp}{'' if consecutive else 's'} dp{dp}"
                                    + (f" {dp_type}" if dp > 1 else "")
                                    + (" ckpt" if ckpt else "")
                                    + (f" c{chunks}" if pp > 1 or chunks > 1 else "")
                                    + (" gpipe" if pipeline == "gpipe" else "")
                                )
                                out.append(
                                    (
                                        name,
                                        Plan(
                                            world_size=world,
                                            layers=(layer,) * layers,
                                            pp=pp,
                                            chunks=chunks,
                                            pipeline=pipeline,
                                            global_batch=global_batch,
                                        ),
                                    )
                                )
    return out


def searched_plan(cost_model, world: int, layers: int, global_batch: int, budget: str) -> Plan:
    """The best predicted plan over one search per pipeline degree (chunks keeping MIN_LOCAL_BATCH)."""
    from galvatron_fx.passes.search.engine import search
    from galvatron_fx.passes.search.space import SearchSpace

    best = None
    for pp in [d for d in _divisors(world) if d <= layers]:
        chunks = tuple(c for c in _divisors(global_batch) if global_batch // c // (world // pp) >= MIN_LOCAL_BATCH)
        if not chunks:
            continue
        space = SearchSpace(
            global_batch=(global_batch, global_batch, 1),
            chunks=chunks,
            sp_types=("none",),
            max_pp=pp,
            only_max_pp=True,
            disable_vtp=True,
            disable_vsp=True,
        )
        plan = search(cost_model, world, budget, space, provenance={"model": MODEL})
        if best is None or plan.prediction.samples_per_s > best.prediction.samples_per_s:
            best = plan
    return best


def measure(
    rank: int,
    world: int,
    shape: str,
    cases,
    global_batch: int,
    warmup: int,
    repeats: int,
    chunks_pp: int,
    measure_memory: bool = True,
) -> dict:
    """Spawned worker: our plans (measure_plans.run_plans), then the native runners."""
    from galvatron_fx.runtime import groups

    ours = run_plans(rank, world, MODEL, shape, cases, warmup, repeats, global_batch, measure_memory)
    device = groups.current_device()
    native = {}
    for strategy in STRATEGIES:
        model, batch = build_model(MODEL, shape, global_batch)
        if strategy == "tp" and model.config.num_attention_heads % world:
            continue
        runner = NativeRunner(model, NativeConfig(strategy, world, chunks_pp if strategy == "pp" else 1), device)
        native[strategy] = time_steps(lambda: runner.step(batch), device, warmup, repeats)
        runner = None  # freed before the next strategy is built
        gc.collect()
    return {"ours": ours, "native": native}


def side_by_side(
    rank: int,
    world: int,
    shape: str,
    cases,
    native_strategy: str,
    global_batch: int,
    warmup: int,
    repeats: int,
    rounds: int,
    chunks_pp: int,
) -> dict[str, list[float]]:
    """Spawned worker: step our ``cases`` and the native runner in alternation, ``rounds`` rounds of
    ``repeats`` timed steps each; the step times per name."""
    warnings.simplefilter("ignore")
    trainers = Trainers(MODEL, shape, global_batch)
    device, batch = trainers.device, trainers.batch
    steps = {name: (lambda trainer=trainers(plan): trainer.step(batch)) for name, plan in cases}
    native_model, native_batch = build_model(MODEL, shape, global_batch)
    runner = NativeRunner(
        native_model, NativeConfig(native_strategy, world, chunks_pp if native_strategy == "pp" else 1), device
    )
    steps[f"native {native_strategy}"] = lambda: runner.step(native_batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds):
        for name, step in steps.items():
            times[name] += time_steps(step, device, warmup if round_index == 0 else 0, repeats)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6, help="alternation rounds of the side-by-side comparison")
    parser.add_argument("--memory-budget", default="4GiB")
    parser.add_argument("--max-plans", type=int, default=None, help="uniform plans to measure (smoke runs)")
    parser.add_argument("--hardware", choices=("measure", "cluster"), default="measure")
    parser.add_argument(
        "--reprofile",
        action="store_true",
        help="profile the hardware and the model again first "
        "(profiles timed at another moment, under another load, mislead the search)",
    )
    parser.add_argument(
        "--out-of-sample",
        default=None,
        metavar="JSON",
        help="price with the profile of a cost_accuracy_oos run (its hardware profile, step probe included; "
        "LLaMA's analytic profile) instead of LLaMA's measured profile, and measure the full uniform space",
    )
    parser.add_argument("--full-grid", action="store_true", help="every uniform plan the search considers")
    parser.add_argument("--no-memory", action="store_true", help="leave the (informational) peak-memory column out")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    from galvatron_fx.cost.model import CostModel

    folder = Path(args.out)
    world, gb = args.world, args.global_batch
    if args.out_of_sample:
        import json

        from benchmarks.cost_accuracy_oos import analytic_profile, priced_hardware

        hardware = priced_hardware(json.loads(Path(args.out_of_sample).read_text())["profile"])
        if hardware.world_size != world:
            raise SystemExit(f"{args.out_of_sample} profiled {hardware.world_size} processes, not {world}")
        profile = analytic_profile(MODEL, hardware)
        cost = CostModel(profile, hardware)
    else:
        profile = model_profile(MODEL, args.shape, folder, args.reprofile, [world])
        cost = CostModel(profile, hardware_profile(world, folder, args.hardware, reprofile=args.reprofile))
    layers = len(profile.layer_types)
    searched = searched_plan(cost, world, layers, gb, args.memory_budget)
    grid = uniform_grid(world, layers, gb, full=args.full_grid or bool(args.out_of_sample))[: args.max_plans]
    cases = grid + [("searched", searched)]
    chunks_pp = 2 * world if gb // (2 * world) >= 1 else world
    per_rank = spawn(measure, world, args.shape, cases, gb, args.warmup, args.repeats, chunks_pp, not args.no_memory)
    flops_per_step = model_flops_per_sample(profile) * gb
    peak_flops, peak_source = device_peak_flops()
    rows, failed = [], []
    for name, plan in cases:
        results = [r for rank in per_rank for r in rank["ours"] if r["plan"] == name]
        if any("error" in r for r in results):
            failed.append({"plan": name, "error": results[0].get("error")})
            continue
        measured = max(median(r["times_s"]) for r in results)
        peak = None if args.no_memory else max(r["peak_bytes"] for r in results)
        rows.append(
            {
                "plan": name,
                "kind": "searched" if name == "searched" else "uniform",
                "measured_ms": measured * 1e3,
                "samples_per_s": gb / measured,
                "predicted_samples_per_s": cost.evaluate(plan).samples_per_s,
                "peak_mib": peak / 2**20 if peak is not None else None,
                "mfu_pct": 100 * mfu(flops_per_step, measured, world, peak_flops),
                "plan_json": plan.to_json_dict(),
            }
        )
    for strategy in per_rank[0]["native"]:
        measured = max(median(rank["native"][strategy]) for rank in per_rank)
        rows.append(
            {
                "plan": f"native {strategy}",
                "kind": "native",
                "measured_ms": measured * 1e3,
                "samples_per_s": gb / measured,
                "mfu_pct": 100 * mfu(flops_per_step, measured, world, peak_flops),
            }
        )
    rows.sort(key=lambda r: -r["samples_per_s"])
    searched_row = next(r for r in rows if r["kind"] == "searched")
    best_row = max((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["samples_per_s"])
    native_row = max((r for r in rows if r["kind"] == "native"), key=lambda r: r["samples_per_s"])
    # side by side: the three contenders in alternation, in a launch of their own
    contenders = [("searched", searched), (best_row["plan"], dict(grid)[best_row["plan"]])]
    per_rank_times = spawn(
        side_by_side,
        world,
        args.shape,
        contenders,
        native_row["plan"].split()[-1],
        gb,
        args.warmup,
        args.repeats,
        args.rounds,
        chunks_pp,
    )
    side = {name: gb / max(median(rank[name]) for rank in per_rank_times) for name in per_rank_times[0]}
    best_plan, best_native = side[best_row["plan"]], side[native_row["plan"]]
    best_uniform_predicted = max(
        (r for r in rows if r["kind"] == "uniform"), key=lambda r: r["predicted_samples_per_s"]
    )
    table = print_table(
        rows,
        [
            ("plan", "plan", ""),
            ("kind", "kind", ""),
            ("measured_ms", "step ms", ".1f"),
            ("samples_per_s", "samples/s", ".2f"),
            ("predicted_samples_per_s", "predicted samples/s", ".2f"),
            ("peak_mib", "peak MiB", ".1f"),
            ("mfu_pct", "MFU %", ".2f"),
        ],
    )
    summary = {
        "searched_plan": searched.layers[0].short() if len(set(searched.layers)) == 1 else "heterogeneous",
        "searched_description": _describe(searched),
        "searched_samples_per_s": side["searched"],
        "best_measured_plan": best_row["plan"],
        "best_measured_samples_per_s": best_plan,
        "best_native": native_row["plan"],
        "best_native_samples_per_s": best_native,
        "side_by_side_rounds": args.rounds,
        "side_by_side_samples_per_s": side,
        "sweep_ratio_to_best_plan": searched_row["samples_per_s"] / best_row["samples_per_s"],
        "ratio_to_best_plan": side["searched"] / best_plan,
        "ratio_to_best_native": side["searched"] / best_native,
        "best_uniform_by_prediction": best_uniform_predicted["plan"],
        **_time_errors([r for r in rows if r["kind"] != "native"]),
        "targets": {"ratio_to_best_plan": 0.95, "ratio_to_best_native": 1.0},
    }
    print(
        f"\nside by side, {args.rounds} alternated rounds: searched plan ({summary['searched_description']}) "
        f"{summary['searched_samples_per_s']:.2f} samples/s = {summary['ratio_to_best_plan']:.3f} × the best measured "
        "plan, "
        f"{best_row['plan']} (target ≥ 0.95), {summary['ratio_to_best_native']:.3f} × the best native baseline, "
        f"{native_row['plan']} (target ≥ 1)"
    )
    payload = {
        "command": command_line(),
        "model": MODEL,
        "shape": SHAPES[args.shape],
        "world": world,
        "global_batch": gb,
        "memory_budget": args.memory_budget,
        "peak_flops_per_device": peak_flops,
        "peak_source": peak_source,
        "summary": summary,
        "rows": rows,
        "table": table,
        "failed": failed,
    }
    payload["profiles"] = args.out_of_sample or "measured (model_profile_llama, hardware_profile)"
    path = write_json(f"plan_quality_w{world}" + ("_oos" if args.out_of_sample else ""), payload, folder)
    print(f"wrote {path}")
    return payload


def _time_errors(rows: list[dict]) -> dict:
    """Predicted against measured step time over the sweep's plans (each measured once)."""
    from benchmarks.common import spearman

    errors = [r["samples_per_s"] / r["predicted_samples_per_s"] - 1 for r in rows]
    return {
        "sweep_median_time_error": median([abs(e) for e in errors]),
        "sweep_worst_time_error": max(abs(e) for e in errors),
        "sweep_spearman_time": spearman(
            [1 / r["predicted_samples_per_s"] for r in rows], [1 / r["samples_per_s"] for r in rows]
        ),
    }


def _describe(plan: Plan) -> str:
    layers = ", ".join(s.short() for s in plan.layers)
    return f"pp{plan.pp} {plan.pipeline} chunks {plan.chunks} division {list(plan.pp_division)}; layers: {layers}"


if __name__ == "__main__":
    main()
