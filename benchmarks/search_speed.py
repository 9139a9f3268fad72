"""Search speed and quality (not a test): prints tables and writes benchmarks/results/search_speed.json.

1. The reference case: Galvatron's LLaMA-2-7B profiles, 1 node × 8 GPUs, 36 GB, bf16, global batch 16,
   every chunk count, full space with Megatron-SP. Search wall time, our plan's predicted samples/s and
   Galvatron's strategy file's, both under our cost model (Galvatron's engine: 82 s, 14.73 samples/s).
2. Scale: the same layer profile repeated to 80 layers on 64 nodes × 8 GPUs (A100 preset) with a batch range.
3. Search time against layers (12..192) and devices (8..4096), each run capped (--cap seconds).

Usage: python benchmarks/search_speed.py [--quick] [--cap 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from galvatron_fx.cluster import Cluster
from galvatron_fx.cost.galvatron_import import load_hardware, load_model
from galvatron_fx.cost.model import CostModel
from galvatron_fx.errors import PlanError
from galvatron_fx.passes.search.engine import search
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "galvatron-llama2-7b"
GALVATRON = {"search_s": 82.0, "samples_per_s": 14.73}


class _Timeout(Exception):
    pass


def _timed_search(cost_model, world, budget, space, cap_s):
    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(cap_s))
    started = time.perf_counter()
    try:
        plan = search(cost_model, world, budget, space)
        return time.perf_counter() - started, plan
    except _Timeout:
        return None, None
    except PlanError as error:
        return time.perf_counter() - started, str(error)
    finally:
        signal.alarm(0)


def _outcome(plan) -> str:
    """What a timed search ended with: a plan, the error naming the smallest budget, or the cap."""
    if plan is None:
        return "over the cap"
    if isinstance(plan, str):
        return "no plan fits: " + plan.split(";")[1].split(",")[0].strip() if ";" in plan else plan
    return f"pp{plan.pp}, {plan.prediction.samples_per_s:.2f} samples/s"


def _scaled(layers: int, nodes: int, per_node: int) -> CostModel:
    """LLaMA-2-7B's layer profile repeated ``layers`` times, on an A100-80GB preset cluster."""
    profile = load_model(FIXTURE)
    profile = dataclasses.replace(
        profile,
        layer_types=[profile.layer_types[0]] * layers,
        cut_bytes_per_sample=[profile.cut_bytes_per_sample[0]] * layers,
    )
    return CostModel(
        profile,
        Cluster.preset("A100-80GB", nodes=nodes, devices_per_node=per_node).hardware_profile(),
        mixed_precision="bf16",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the sweeps")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per sweep search")
    args = parser.parse_args()
    results: dict = {
        "command": " ".join(["python benchmarks/search_speed.py", *sys.argv[1:]]),
        "cap_s": args.cap,
        "load_average_before": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")

    cost_model = CostModel(load_model(FIXTURE), load_hardware(FIXTURE, memory_bytes=36 * 10**9), mixed_precision="bf16")
    theirs = cost_model.evaluate(
        Plan.load(FIXTURE / "galvatron_config_llama2-7b_1nodes_8gpus_per_node_36GB_bf16.json", world_size=8)
    )
    space = SearchSpace(global_batch=(16, 16, 1))
    started = time.perf_counter()
    ours = search(cost_model, 8, "36GB", space)
    wall = time.perf_counter() - started
    results["fixture"] = {
        "search_s": wall,
        "ours_samples_per_s": ours.prediction.samples_per_s,
        "galvatron_plan_samples_per_s_our_model": theirs.samples_per_s,
        "galvatron_engine": GALVATRON,
        "plan": ours.to_json_dict(),
    }
    print("reference case (LLaMA-2-7B, 1x8, 36 GB, bf16, global batch 16, full space)")
    print(f"  search wall time      {wall:8.2f} s   (Galvatron's engine: {GALVATRON['search_s']:.0f} s; target <= 1 s)")
    print(f"  our plan              {ours.prediction.samples_per_s:8.3f} samples/s (our cost model)")
    print(
        f"  Galvatron's plan      {theirs.samples_per_s:8.3f} samples/s (our cost model; Galvatron's own estimate "
        f"{GALVATRON['samples_per_s']})"
    )
    print(f"  ratio ours/theirs     {ours.prediction.samples_per_s / theirs.samples_per_s:8.3f}")

    scale_space = SearchSpace(global_batch=(256, 1024, 256), chunks=(1, 2, 4, 8, 16, 32, 64))
    seconds, plan = _timed_search(_scaled(80, 64, 8), 512, "80GB", scale_space, 600)
    results["scale"] = {
        "layers": 80,
        "devices": 512,
        "search_s": seconds,
        "samples_per_s": plan.prediction.samples_per_s if isinstance(plan, Plan) else None,
    }
    print(
        f"scale case (80 layers, 64x8 A100, batch 256..1024 step 256): "
        f"{'over 600 s' if seconds is None else f'{seconds:.1f} s'} (target <= 30 s)"
    )

    if not args.quick:
        rows = []
        for layers in (12, 24, 48, 96, 192):
            seconds, plan = _timed_search(
                _scaled(layers, 1, 8), 8, "80GB", SearchSpace(global_batch=(64, 64, 1)), args.cap
            )
            rows.append(
                {"sweep": "layers", "layers": layers, "devices": 8, "search_s": seconds, "outcome": _outcome(plan)}
            )
        for nodes in (1, 4, 16, 64, 512):
            seconds, plan = _timed_search(
                _scaled(32, nodes, 8),
                nodes * 8,
                "80GB",
                SearchSpace(global_batch=(nodes * 64, nodes * 64, 1)),
                args.cap,
            )
            rows.append(
                {"sweep": "devices", "layers": 32, "devices": nodes * 8, "search_s": seconds, "outcome": _outcome(plan)}
            )
        results["sweep"] = rows
        for sweep, title in (
            ("layers", "search time against layers (8 devices, batch 64)"),
            ("devices", "search time against devices (32 layers, batch 64 per node)"),
        ):
            print(title)
            print(f"{'layers':>7} {'devices':>8} {'search s':>10}  outcome")
            for row in (r for r in rows if r["sweep"] == sweep):
                print(
                    f"{row['layers']:>7} {row['devices']:>8} "
                    f"{'> cap' if row['search_s'] is None else format(row['search_s'], '.2f'):>10}"
                    f"  {row['outcome']}"
                )

    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    out = ROOT / "benchmarks" / "results" / "search_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
