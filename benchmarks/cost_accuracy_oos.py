"""Cost-model accuracy out of sample: profiles from one launch, plans measured in others.

``cost_accuracy --reprofile`` prices plans with profiles taken in the same launch, at the same process
counts, TP degrees and batch sizes as the plans it predicts. Here nothing the prediction uses saw the
plans, their models or their batch size:

1. *Profile launch* (first, once): ``galvatron-fx profile-hardware`` on 4 processes (2 with ``--world 2``):
   collectives, p2p, overlap, Adam step, compute slowdown, and its step probe (cost/step_probe.py: a
   Transformer block that is none of the models, trained at several batch sizes on rank 0 alone, fp32 and bf16
   autocast, its figures scaled by the measured compute slowdown of all ranks at once), which gives the
   marginal throughput per dtype, the time per dispatched operator and per parameter that autocast casts, and
   fused attention's own line per pass and dtype. No model is
   profiled: the models predicted are priced with the *analytic* profile of their own capture
   (``ModelProfile.from_program``: FLOPs, dispatched operators, cast parameters and graph memory) at those
   figures, as ``compile(profile="analytic", hardware_profile=...)`` prices them.
2. *Measurement launches*: LLaMA and BERT, as many processes, global batch 8 (not 4), fp32 and bf16
   (autocast), one launch per model, dtype and round with its plans in turn (every other round reversed);
   the slowest rank's median step.
   Peak memory per rank with ``benchmarks.common.trainer_peak_bytes`` in the first round.
3. Report per strategy kind (DP, ZeRO-2, ZeRO-3, TP, TP+SP, PP, mixed) and dtype: median and worst
   |time error|, Spearman of predicted and measured time, memory error per rank. The stored
   ``plan_quality_w4.json`` (LLaMA at 4 processes priced from stored profiles) is summarised alongside.

    python benchmarks/cost_accuracy_oos.py                   # profile, then measure (about 11 minutes)
    python benchmarks/cost_accuracy_oos.py --world 2         # the same on 2 processes, one per core (about 6)
    python benchmarks/cost_accuracy_oos.py --predict-only benchmarks/results/cost_accuracy_oos.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
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
    spearman,
    time_steps,
    trainer_peak_bytes,
    write_json,
)
from benchmarks.profiles import profile_hardware
from galvatron_fx.plan import LayerStrategy, Plan

WORLD = 4
GLOBAL_BATCH = 8
MODELS = ("llama", "bert")
DTYPES = ("fp32", "bf16")


def plans(layers: int, world: int = WORLD) -> list[tuple[str, str, Plan]]:
    """(name, kind, plan) for ``world`` processes (4 or 2): each strategy kind, uniform, plus pipelines and
    mixed plans; at 2 processes the plans that need 4 become their 2-process counterparts."""
    half = world // 2

    def p(name, kind, pattern, *, pp=1, chunks=1, pipeline="1f1b"):
        devices = world // pp
        strategies = []
        for i in range(layers):
            tp, dp_type, ckpt, sp = pattern[i % len(pattern)]
            tp = min(tp, devices)
            dp = devices // tp
            strategies.append(LayerStrategy(tp=tp, dp=dp, dp_type=dp_type if dp > 1 else "ddp", ckpt=ckpt, sp=sp))
        plan = Plan(
            world_size=world,
            layers=tuple(strategies),
            pp=pp,
            chunks=chunks,
            pipeline=pipeline,
            global_batch=GLOBAL_BATCH,
        )
        return name, kind, plan

    dp, sp = (1, "ddp", False, "none"), "megatron"
    cases = [
        p(f"dp{world}", "DP", [dp]),
        p(f"dp{world}-zero2", "ZeRO-2", [(1, "zero2", False, "none")]),
        p(f"dp{world}-zero3", "ZeRO-3", [(1, "zero3", False, "none")]),
        p(f"dp{world}-zero3-ckpt", "ZeRO-3", [(1, "zero3", True, "none")]),
        p(f"tp2-dp{half}" if half > 1 else "tp2", "TP", [(2, "ddp", False, "none")]),
        p(f"tp{world}", "TP", [(world, "ddp", False, "none")]),
        p(f"tp2-sp-dp{half}" if half > 1 else "tp2-sp", "TP+SP", [(2, "ddp", False, sp)]),
        p(f"tp{world}-sp", "TP+SP", [(world, "ddp", False, sp)]),
        p(f"pp2-dp{half}-1f1b-c2" if half > 1 else "pp2-1f1b-c2", "PP", [dp], pp=2, chunks=2),
        p(f"pp{world}-gpipe-c4", "PP", [dp], pp=world, chunks=4, pipeline="gpipe"),
        p(
            f"mixed-dp/zero3ckpt/tp2sp/tp{world}",
            "mixed",
            [dp, (1, "zero3", True, "none"), (2, "ddp", False, sp), (world, "zero2", False, "none")],
        ),
    ]
    if half > 1:
        cases.append(p("pp2-mixed-c2", "mixed", [(2, "ddp", False, sp), (1, "zero2", True, "none")], pp=2, chunks=2))
    else:  # a stage of one process: checkpointed and plain layers alternating
        cases.append(p("pp2-ckpt-c2", "mixed", [dp, (1, "ddp", True, "none")], pp=2, chunks=2))
    return list({name: (name, kind, plan) for name, kind, plan in cases}.values())  # tp2 is tp{world} at 2


# -- profile launch ------------------------------------------------------------------------------------
def profile_launch(folder: Path, world: int) -> dict:
    path = folder / f"oos_hardware_profile_{world}.json"
    profile_hardware(world, path)
    return profile_of(path, world)


def profile_of(path: Path, world: int) -> dict:
    from galvatron_fx.cost.hardware import HardwareProfile

    return {"hardware_path": str(path), "hardware": HardwareProfile.load(path, world_size=world).to_json_dict()}


def priced_hardware(profile: dict):
    from galvatron_fx.cost.hardware import HardwareProfile

    return HardwareProfile.from_json_dict(copy.deepcopy(profile["hardware"]), source=profile["hardware_path"])


# -- measurement launches ------------------------------------------------------------------------------
def run_plans(rank: int, world: int, model_name: str, dtype: str, cases, warmup: int, repeats: int, memory: bool):
    """Spawned worker: train each of ``cases`` (name, plan) in turn; per plan this rank's step times, peak
    bytes (with ``memory``) and stage, or the lowering error."""
    from galvatron_fx import capture
    from galvatron_fx.errors import GalvatronError
    from galvatron_fx.passes.lower.stage import local_micro_batch
    from galvatron_fx.runtime import Trainer, groups
    from galvatron_fx.runtime.train import TrainConfig

    warnings.simplefilter("ignore")
    device = groups.current_device()
    model, batch = build_model(model_name, "bench", GLOBAL_BATCH)
    programs, out = {}, {}
    for name, plan in cases:
        local = local_micro_batch(plan)
        if local not in programs:
            example = {k: v[:local] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            programs[local] = capture(model, example_kwargs=example)
        try:
            trainer = Trainer(programs[local], plan, device=device, config=TrainConfig(mixed_precision=dtype))
        except GalvatronError as error:  # raised on every rank alike, before any collective
            out[name] = {"rank": rank, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        times = time_steps(lambda: trainer.step(batch), device, warmup, repeats)
        peak = trainer_peak_bytes(trainer, batch) if memory else None
        out[name] = {"rank": rank, "stage": trainer.stage.position.stage, "times_s": times, "peak_bytes": peak}
        trainer = None  # the plan's state goes before the next plan's is built
        gc.collect()
    return out


def measure(models, dtypes, cases_by_model, warmup, repeats, rounds, world: int) -> dict:
    """One launch per model, dtype and round, its plans in turn; every other round in reverse order, and the
    (model, dtype) launches rotated, so that each plan's measurements centre on the middle of the run."""
    launches = [(m, d) for m in models for d in dtypes]
    out: dict[str, list[dict]] = {}
    for r in range(rounds):
        shift = r % len(launches)
        for m, d in launches[shift:] + launches[:shift]:
            cases = [(name, plan) for name, _, plan in cases_by_model[m]]
            cases = cases if r % 2 == 0 else cases[::-1]
            start = time.perf_counter()
            try:
                ranks = spawn(run_plans, world, m, d, cases, warmup, repeats, r == 0)
            except Exception as error:  # a failed launch is reported, the run goes on
                print(f"round {r} {m}/{d} failed: {error}", flush=True)
                continue
            for name, _ in cases:
                key, results = f"{m}/{d}/{name}", [rank[name] for rank in ranks]
                if key not in out:
                    out[key] = results
                elif not any("error" in x for x in results + out[key]):
                    for first, again in zip(out[key], results):
                        first["times_s"] = first["times_s"] + again["times_s"]
            print(f"round {r} {m}/{d}: {time.perf_counter() - start:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return out


# -- prediction and report -----------------------------------------------------------------------------
def analytic_profile(model_name: str, hardware):
    from galvatron_fx import capture
    from galvatron_fx.cost.model_profile import ModelProfile

    warnings.simplefilter("ignore")
    model, batch = build_model(model_name, "bench", GLOBAL_BATCH)
    return ModelProfile.from_program(
        capture(model, example_kwargs=batch),
        flops_per_s=hardware.flops_per_s["fp32"],
        dtype="fp32",
        op_overhead_s=hardware.op_overhead_s,
    )


def predict_rows(models, dtypes, cases_by_model, measured, hardware) -> tuple[list[dict], list[dict]]:
    from galvatron_fx.cost.model import CostModel

    rows, failed = [], []
    for m in models:
        profile = analytic_profile(m, hardware)
        for d in dtypes:
            cost = CostModel(profile, hardware, mixed_precision=d)
            for name, kind, plan in cases_by_model[m]:
                results = measured.get(f"{m}/{d}/{name}")
                if not results:
                    continue
                if any("error" in r for r in results):
                    failed.append({"model": m, "dtype": d, "plan": name, "error": results[0]["error"]})
                    continue
                pred = cost.evaluate(plan)
                measured_s = max(median(r["times_s"]) for r in results)
                p_mem = [pred.memory_bytes_per_stage[r["stage"]] for r in results]
                m_mem = [r["peak_bytes"] for r in results]
                rows.append(
                    {
                        "model": m,
                        "dtype": d,
                        "plan": name,
                        "kind": kind,
                        "plan_json": plan.to_json_dict(),
                        "predicted_ms": pred.iteration_time_s * 1e3,
                        "measured_ms": measured_s * 1e3,
                        "time_error": pred.iteration_time_s / measured_s - 1,
                        "predicted_mib": max(p_mem) / 2**20,
                        "measured_mib": max(m_mem) / 2**20,
                        "memory_errors_per_rank": [p / x - 1 for p, x in zip(p_mem, m_mem)],
                        "worst_rank_memory_error": max((p / x - 1 for p, x in zip(p_mem, m_mem)), key=abs),
                        "step_times_s": [r["times_s"] for r in results],
                        "measured_peak_bytes_per_rank": m_mem,
                        "predicted_peak_bytes_per_rank": p_mem,
                        "stages": [r["stage"] for r in results],
                    }
                )
    return rows, failed


def summary_of(rows: list[dict]) -> dict:
    if not rows:
        return {}
    t = [abs(r["time_error"]) for r in rows]
    mem = [abs(e) for r in rows for e in r["memory_errors_per_rank"]]
    return {
        "plans": len(rows),
        "median_time_error": median(t),
        "worst_time_error": max(t),
        "spearman_time": spearman([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
        if len(rows) >= 3
        else None,
        "median_memory_error": median(mem),
        "worst_memory_error": max(mem),
    }


def plan_quality_oos(folder: Path) -> dict | None:
    """The stored plan_quality sweep (LLaMA, 4 processes, measured once, priced from stored profiles): its
    predicted against measured step time."""
    path = folder / "plan_quality_w4.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("predicted_samples_per_s")]
    errors = [r["samples_per_s"] / r["predicted_samples_per_s"] - 1 for r in rows]  # predicted/measured time - 1
    throughput = [abs(r["predicted_samples_per_s"] / r["samples_per_s"] - 1) for r in rows]
    return {
        "median_throughput_error": median(throughput),
        "worst_throughput_error": max(throughput),
        "file": str(path.relative_to(RESULTS.parent.parent)),
        "written": data.get("environment", {}).get("time"),
        "plans": len(rows),
        "median_time_error": median([abs(e) for e in errors]),
        "worst_time_error": max(abs(e) for e in errors),
        "spearman_time": spearman(
            [1 / r["predicted_samples_per_s"] for r in rows], [1 / r["samples_per_s"] for r in rows]
        ),
    }


def report(rows, failed, profile, hardware, args, measured_load) -> dict:
    rows.sort(key=lambda r: (r["model"], r["dtype"], r["kind"], r["plan"]))
    table = print_table(
        rows,
        [
            ("model", "model", ""),
            ("dtype", "dtype", ""),
            ("kind", "kind", ""),
            ("plan", "plan", ""),
            ("predicted_ms", "predicted ms", ".1f"),
            ("measured_ms", "measured ms", ".1f"),
            ("time_error", "time err", "+.1%"),
            ("predicted_mib", "pred. peak MiB", ".1f"),
            ("measured_mib", "meas. peak MiB", ".1f"),
            ("worst_rank_memory_error", "worst-rank mem err", "+.1%"),
        ],
    )
    kinds = sorted({r["kind"] for r in rows}, key=["DP", "ZeRO-2", "ZeRO-3", "TP", "TP+SP", "PP", "mixed"].index)
    by_kind = []
    for kind in kinds:
        for d in DTYPES:
            s = summary_of([r for r in rows if r["kind"] == kind and r["dtype"] == d])
            if s:
                by_kind.append({"kind": kind, "dtype": d, **s})
    for d in DTYPES:
        s = summary_of([r for r in rows if r["dtype"] == d])
        if s:
            by_kind.append({"kind": "all", "dtype": d, **s})
    by_kind.append({"kind": "all", "dtype": "both", **summary_of(rows)})
    kind_table = print_table(
        by_kind,
        [
            ("kind", "kind", ""),
            ("dtype", "dtype", ""),
            ("plans", "plans", ""),
            ("median_time_error", "median time err", ".1%"),
            ("worst_time_error", "worst time err", ".1%"),
            ("spearman_time", "Spearman", ".3f"),
            ("median_memory_error", "median mem err", ".1%"),
            ("worst_memory_error", "worst mem err", ".1%"),
        ],
    )
    overall = summary_of(rows)
    pq = plan_quality_oos(Path(args.out))
    print(
        f"\nout of sample: median |time error| {overall['median_time_error']:.1%}, "
        f"worst {overall['worst_time_error']:.1%}, "
        f"Spearman {overall['spearman_time']:.3f}, memory median {overall['median_memory_error']:.1%} worst "
        f"{overall['worst_memory_error']:.1%}; {len(rows)} plans, {len(failed)} failed"
    )
    payload = {
        "command": command_line(),
        "protocol": " ".join(__doc__.split("\n\n")[2].split()),
        "measured_command": args.measured_command,
        "world": args.world,
        "global_batch": GLOBAL_BATCH,
        "shape": SHAPES["bench"],
        "profile": profile,
        "priced_flops_per_s": hardware.flops_per_s,
        "summary": overall,
        "by_kind": by_kind,
        "targets": {"median_time_error": 0.10, "worst_time_error": 0.25, "memory_error": 0.10},
        "plan_quality_w4": pq,
        "load_during_measurement": measured_load,
        "rows": rows,
        "table": table,
        "kind_table": kind_table,
        "failed": failed,
    }
    path = write_json(args.name, payload, Path(args.out))
    print(f"wrote {path}")
    return payload


def cases_of(models, args) -> dict:
    return {m: plans(SHAPES["bench"]["layers"], args.world)[: args.max_plans] for m in models}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--world", type=int, choices=(2, 4), default=WORLD, help="processes (2: one per core of this machine)"
    )
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-plans", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--predict-only", default=None, metavar="JSON", help="price an earlier run's measurements again"
    )
    parser.add_argument(
        "--hardware-profile",
        default=None,
        metavar="JSON",
        help="with --predict-only: price with this profile-hardware file (a launch of its own) instead of the run's",
    )
    args = parser.parse_args(argv)
    folder = Path(args.out)
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    previous = json.loads(Path(args.predict_only).read_text()) if args.predict_only else None
    if previous:
        args.world = previous.get("world", WORLD)
    if args.name is None:  # the 4-process run keeps its historical name
        args.name = "cost_accuracy_oos" if args.world == WORLD else f"cost_accuracy_oos_w{args.world}"
    if previous:
        profile, loads = previous["profile"], previous.get("load_during_measurement")
        args.measured_command = previous.get("measured_command") or previous["command"]
        measured = {
            f"{r['model']}/{r['dtype']}/{r['plan']}": [
                {"rank": i, "stage": s, "times_s": t, "peak_bytes": b}
                for i, (s, t, b) in enumerate(zip(r["stages"], r["step_times_s"], r["measured_peak_bytes_per_rank"]))
            ]
            for r in previous["rows"]
        }
        for f in previous.get("failed", []):
            measured[f"{f['model']}/{f['dtype']}/{f['plan']}"] = [{"error": f["error"]}]
        if args.hardware_profile:
            profile = profile_of(Path(args.hardware_profile), args.world)
    else:
        profile = profile_launch(folder, args.world)
        print(f"profile: {json.dumps(profile['hardware']['flops_per_s'])}", flush=True)
        before = os.getloadavg()
        measured = measure(models, dtypes, cases_of(models, args), args.warmup, args.repeats, args.rounds, args.world)
        loads = {"before": before, "after": os.getloadavg()}
        args.measured_command = command_line()
    hardware = priced_hardware(profile)
    rows, failed = predict_rows(models, dtypes, cases_of(models, args), measured, hardware)
    return report(rows, failed, profile, hardware, args, loads)


if __name__ == "__main__":
    main()
