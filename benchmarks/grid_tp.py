"""Grid tensor parallelism (2D, 2.5D, 3D) against 1D: measured step time and memory with the cost model's
predictions, and offline searches that show where the search picks each mode.

``measure`` (the default): GPT-2 at the "bench" shape of benchmarks/common.py (hidden 256, 4 heads: q = 2 divides
both), global batch 8, fp32, every body layer under one strategy: on 4 processes tp4 1D and tp4 2D, on 8
processes tp8 1D, tp8 2.5D (q = 2, depth 2) and tp8 3D (q = 2), with pure data parallelism of each world as a
reference. Every plan of every world is trained in alternating rounds of fresh launches
(``measure_plans.measure_in_rounds``) and priced by ``CostModel.evaluate`` from the measured hardware profile of
its world (benchmarks/results/hardware_profile_{world}.json, made with profile-hardware where missing) and the
stored GPT-2 model profile. Per plan: median step time (the slowest rank), predicted time, peak memory per rank
measured and predicted, and the speed relative to the 1D plan of the same world, measured and predicted.
JSON: benchmarks/results/grid_tp.json.

``search``: offline searches (no processes) of LLaMA-7B (sequence 1024, bf16, datasheet figures and the graph's
FLOPs, as ``galvatron-fx search`` prices them) on A100-80GB:8x8 and on the same cluster with a tenth of the
bandwidth across nodes (benchmarks/results/grid_tp_slow_cluster.json, a cluster file the CLI reads), at a few
memory budgets and global batches: each searched with every tp mode and with 1D only; per case the per-layer
strategies, predicted samples/s of both and the ratio, and the ``--explain`` lines for grid layers (bytes sent
per device against 1D of the same degree). JSON: benchmarks/results/grid_tp_search.json.

    python benchmarks/grid_tp.py                      # measure on 4 and 8 processes (profiles 8 if missing)
    python benchmarks/grid_tp.py --worlds 4 --hardware cluster --warmup 1 --repeats 2 --rounds 1   # smoke run
    python benchmarks/grid_tp.py search               # the offline searches (a few minutes, mostly capture)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    REPO,
    RESULTS,
    SHAPES,
    command_line,
    device_peak_flops,
    model_flops_per_sample,
    print_table,
    write_json,
)
from benchmarks.cost_accuracy import compare_row
from benchmarks.measure_plans import GLOBAL_BATCH, measure_in_rounds
from benchmarks.profiles import hardware_profile, model_profile
from galvatron_fx.plan import LayerStrategy, Plan

MODEL, SHAPE = "gpt2", "bench"
# name → LayerStrategy keywords (dp follows from the world); the first of each world is the reference
STRATEGIES = {
    4: {"dp4": dict(tp=1), "tp4 1d": dict(tp=4), "tp4 2d": dict(tp=4, tp_mode="2d")},
    8: {
        "dp8": dict(tp=1),
        "tp8 1d": dict(tp=8),
        "tp8 2.5d d2": dict(tp=8, tp_mode="2.5d", tp_depth=2),
        "tp8 3d": dict(tp=8, tp_mode="3d"),
    },
}


# -- measure -------------------------------------------------------------------------------------------
def measured_plans(world: int, layers: int) -> list[tuple[str, Plan]]:
    """Uniform plans of ``world`` processes: every body layer under one strategy, global batch 8."""
    return [
        (name, Plan(world_size=world, layers=(LayerStrategy(dp=world // kw["tp"], **kw),) * layers, global_batch=8))
        for name, kw in STRATEGIES[world].items()
    ]


def priced_from(profile, world: int, strategy: LayerStrategy) -> str:
    """How CostModel prices the plan's layers: timed in place at this world (1D and DP where the model profile
    has such a pass), else one process's layer times with the collectives from the hardware profile."""
    types = {profile.types[t].in_place_times.get(world, {}).get(strategy.tp) is not None for t in profile.layer_types}
    return "in place" if strategy.tp_mode == "1d" and all(types) else "one-process times + collectives"


def measure(args) -> dict:
    from galvatron_fx.cost.model import CostModel

    assert GLOBAL_BATCH == 8  # measure_in_rounds trains at cost_accuracy's global batch
    shape = SHAPES[SHAPE]
    assert shape["hidden"] % 2 == 0 and shape["heads"] % 2 == 0, "q = 2 must divide the hidden size and heads"
    folder, worlds = Path(args.out), [int(w) for w in args.worlds.split(",")]
    hardware = {w: hardware_profile(w, folder, args.hardware, args.reprofile) for w in worlds}
    profile = model_profile(MODEL, SHAPE, RESULTS, False, worlds)  # the stored profile
    cases = {w: measured_plans(w, len(profile.layer_types)) for w in worlds}
    measured = measure_in_rounds(MODEL, SHAPE, cases, args.warmup, args.repeats, args.rounds)
    peak_flops, _ = device_peak_flops()
    flops_per_step = model_flops_per_sample(profile) * GLOBAL_BATCH
    rows, failed = [], []
    for world in worlds:
        cost = CostModel(profile, hardware[world])
        world_rows = []
        for name, plan in cases[world]:
            results = [r for rank in measured[world] for r in rank if r["plan"] == name]
            if any("error" in r for r in results):
                failed.append({"world": world, "plan": name, "error": results[0]["error"]})
                print(f"w{world} {name}: FAILED {failed[-1]['error']}", flush=True)
                continue
            row = compare_row(MODEL, world, name, plan, cost.evaluate(plan), results, flops_per_step, peak_flops)
            row["priced_from"] = priced_from(profile, world, plan.layers[0])
            world_rows.append(row)
        one_d = next((r for r in world_rows if r["plan"] == f"tp{world} 1d"), None)
        for row in world_rows:
            row["measured_ms"], row["predicted_ms"] = row["measured_s"] * 1e3, row["predicted_s"] * 1e3
            row["measured_mib"] = row["measured_peak_bytes"] / 2**20
            row["predicted_mib"] = row["predicted_peak_bytes"] / 2**20
            if one_d:  # > 1: faster than 1D
                row["speed_vs_1d_measured"] = one_d["measured_s"] / row["measured_s"]
                row["speed_vs_1d_predicted"] = one_d["predicted_s"] / row["predicted_s"]
        rows += world_rows
    table = print_table(
        rows,
        [
            ("world", "procs", ""),
            ("plan", "plan", ""),
            ("measured_ms", "measured ms", ".1f"),
            ("predicted_ms", "predicted ms", ".1f"),
            ("time_error", "time err", "+.1%"),
            ("measured_mib", "meas. peak MiB", ".1f"),
            ("predicted_mib", "pred. peak MiB", ".1f"),
            ("memory_error_max_rank", "mem err", "+.1%"),
            ("speed_vs_1d_measured", "speed vs 1D meas.", ".3f"),
            ("speed_vs_1d_predicted", "speed vs 1D pred.", ".3f"),
            ("priced_from", "priced from", ""),
        ],
    )
    payload = {
        "command": command_line(),
        "model": MODEL,
        "shape": shape,
        "global_batch": GLOBAL_BATCH,
        "rows": rows,
        "failed": failed,
        "table": table,
        "hardware_profiles": {w: hardware[w].source for w in worlds},
        "hardware_source": args.hardware,
        "notes": "speed vs 1D: the 1D plan's step time over the plan's (> 1 is faster), measured and predicted",
    }
    print(f"wrote {write_json('grid_tp', payload, folder)}")
    return payload


# -- search --------------------------------------------------------------------------------------------
SEARCH_MODEL, SEARCH_SEQ, PRECISION = "llama-7b", 1024, "bf16"
ALL_MODES, ONE_D = ("1d", "2d", "2.5d", "3d"), ("1d",)
# (memory budget per device, global batch, SearchSpace overrides): "full" allows pipelines; at batch 256 the
# full space's search runs for minutes on the 8x8 preset, so those cases search tp × dp × ZeRO × ckpt (no pp)
CASES = [
    ("8GiB", 64, {}),
    ("16GiB", 64, {}),
    ("40GiB", 64, {}),
    ("16GiB", 256, {"disable_pp": True}),
    ("40GiB", 256, {"disable_pp": True}),
]
SLOW_CLUSTER = {"preset": "A100-80GB", "nodes": 8, "devices_per_node": 8, "inter_node_Bps": 25e9 / 10}


def clusters(folder: Path) -> dict:
    """name → (Cluster, the --cluster argument that gives it to ``galvatron-fx search``)."""
    from galvatron_fx.commands.search import _cluster

    slow_path = folder / "grid_tp_slow_cluster.json"
    slow_path.write_text(json.dumps(SLOW_CLUSTER, indent=2) + "\n")
    fast = _cluster("A100-80GB:8x8")
    slow = _cluster(str(slow_path))
    assert slow == dataclasses.replace(fast, inter_node_Bps=fast.inter_node_Bps / 10)
    shown = slow_path.resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
    return {"A100-80GB:8x8": (fast, "A100-80GB:8x8"), "A100-80GB:8x8, inter-node /10": (slow, str(shown))}


def search_case(cost_model, world: int, budget: str, batch: int, overrides: dict) -> dict:
    """One case searched with every tp mode and with 1D only (``galvatron-fx search``'s functions)."""
    from galvatron_fx.passes.search.engine import search
    from galvatron_fx.passes.search.report import explain
    from galvatron_fx.passes.search.space import SearchSpace

    out = {}
    for label, modes in (("all", ALL_MODES), ("1d", ONE_D)):
        space = SearchSpace.named("full", global_batch=(batch, batch, 1), tp_modes=modes, **overrides)
        started = time.perf_counter()
        plan = search(cost_model, world, budget, space)
        seconds = time.perf_counter() - started
        out[label] = {
            "samples_per_s": plan.prediction.samples_per_s,
            "iteration_ms": plan.prediction.iteration_time_s * 1e3,
            "peak_gib": max(plan.prediction.memory_bytes_per_stage) / 2**30,
            "pp": plan.pp,
            "chunks": plan.chunks,
            "layers": dict(Counter(layer.short() for layer in plan.layers).most_common()),
            "search_s": seconds,
            "plan_json": plan.to_json_dict(),
        }
        if label == "all":
            text = explain(plan, cost_model, budget, space)
            out[label]["explain"] = text
            out[label]["grid_lines"] = [line.strip() for line in text.splitlines() if " sends " in line]
            out[label]["grid_vs_1d"] = grid_vs_1d(plan, cost_model)
    out["ratio"] = out["all"]["samples_per_s"] / out["1d"]["samples_per_s"]
    return out


def grid_vs_1d(plan, cost_model) -> list[dict]:
    """Each grid strategy of ``plan`` against 1D of the same degree, dp and checkpointing (with and without
    Megatron-SP), one layer at the plan's micro-batch: time (forward, backward, gradient sync) and the activations
    it keeps, from ``CostModel.layer_cost``."""
    out = []
    for strategy in dict.fromkeys(s for s in plan.layers if s.tp_mode != "1d"):
        layer_type = cost_model.layer_types[plan.layers.index(strategy)]
        row = {"strategy": strategy.short()}
        for label, s in (
            ("grid", strategy),
            ("1d", dataclasses.replace(strategy, tp_mode="1d", tp_depth=1)),
            ("1d-sp", dataclasses.replace(strategy, tp_mode="1d", tp_depth=1, sp="megatron")),
        ):
            cost = cost_model.layer_cost(layer_type, s, plan.micro_batch)
            row[f"{label}_ms"] = (cost.fwd_s + cost.bwd_s + cost.grad_sync_s) * 1e3
            row[f"{label}_activation_mib"] = cost.activation_bytes / 2**20
        row["text"] = (
            f"[{row['strategy']}] one layer {row['grid_ms']:.2f} ms, keeps {row['grid_activation_mib']:.0f} MiB; "
            f"1D {row['1d_ms']:.2f} ms, {row['1d_activation_mib']:.0f} MiB; "
            f"1D-SP {row['1d-sp_ms']:.2f} ms, {row['1d-sp_activation_mib']:.0f} MiB"
        )
        out.append(row)
    return out


def layers_text(result: dict) -> str:
    mix = ", ".join(f"{n}×[{s}]" for s, n in result["layers"].items())
    return f"pp{result['pp']} c{result['chunks']}: {mix}"


def search_part(args) -> dict:
    import warnings

    from galvatron_fx.commands.search import _program
    from galvatron_fx.compile import build_cost_model

    warnings.simplefilter("ignore")
    folder = Path(args.out)
    started = time.perf_counter()
    program, _ = _program(SEARCH_MODEL, SEARCH_SEQ)  # as the CLI captures it: meta device, real size
    print(f"captured {SEARCH_MODEL} in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for cluster_name, (cluster, cli_cluster) in clusters(folder).items():
        cost_model = build_cost_model(program, cluster, "analytic", PRECISION)
        for budget, batch, overrides in CASES:
            result = search_case(cost_model, cluster.world_size, budget, batch, overrides)
            space = "full" if not overrides else "no pp"
            row = {
                "cluster": cluster_name,
                "budget": budget,
                "batch": batch,
                "space": space,
                "command": f"galvatron-fx search {SEARCH_MODEL} --cluster {cli_cluster} --memory {budget} "
                f"--batch {batch} --seq {SEARCH_SEQ} --mixed-precision {PRECISION}"
                + (" --disable-pp" if overrides else "")
                + " --explain   # and --tp-modes 1d",
                **result,
                "all_layers": layers_text(result["all"]),
                "one_d_layers": layers_text(result["1d"]),
                "all_samples_per_s": result["all"]["samples_per_s"],
                "one_d_samples_per_s": result["1d"]["samples_per_s"],
            }
            rows.append(row)
            print(
                f"{cluster_name} {budget} batch {batch} ({space}): all modes {row['all_samples_per_s']:.2f} "
                f"samples/s [{row['all_layers']}], 1d {row['one_d_samples_per_s']:.2f} [{row['one_d_layers']}], "
                f"{row['ratio']:.3f}×",
                flush=True,
            )
            for line in result["all"]["grid_lines"] + [g["text"] for g in result["all"]["grid_vs_1d"]]:
                print("   ", line, flush=True)
    columns = [
        ("cluster", "cluster", ""),
        ("budget", "budget", ""),
        ("batch", "batch", ""),
        ("space", "space", ""),
        ("all_layers", "searched, all modes", ""),
        ("all_samples_per_s", "samples/s", ".2f"),
        ("one_d_layers", "searched, 1d only", ""),
        ("one_d_samples_per_s", "samples/s", ".2f"),
        ("ratio", "ratio", ".3f"),
    ]
    table = print_table(rows, columns)
    payload = {
        "command": command_line(),
        "model": SEARCH_MODEL,
        "seq": SEARCH_SEQ,
        "mixed_precision": PRECISION,
        "priced_from": "datasheet figures and the graph's FLOPs (analytic), as galvatron-fx search without profiles",
        "slow_cluster": SLOW_CLUSTER,
        "rows": rows,
        "table": table,
    }
    print(f"wrote {write_json('grid_tp_search', payload, folder)}")
    return payload


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=("measure", "search"), default="measure")
    parser.add_argument("--worlds", default="4,8", help="process counts to measure (4 and/or 8)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per plan and round")
    parser.add_argument("--rounds", type=int, default=2, help="launches per plan, alternating order")
    parser.add_argument(
        "--hardware",
        choices=("measure", "cluster"),
        default="measure",
        help="profile-hardware (stored per world), or the detected cluster's datasheet estimate (smoke runs)",
    )
    parser.add_argument("--reprofile", action="store_true", help="run profile-hardware again for each world")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON (and missing hardware profiles)")
    args = parser.parse_args(argv)
    return search_part(args) if args.part == "search" else measure(args)


if __name__ == "__main__":
    main()
