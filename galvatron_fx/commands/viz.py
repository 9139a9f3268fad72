"""Draw a plan for a model: one self-contained HTML page (layer graph coloured by strategy, pipeline stages,
collectives and redistributions, per-layer predicted time and memory, per-stage memory against the budget,
the pipeline schedule as a timeline), an ONNX file of the annotated graph for Netron, and Graphviz DOT.
Works offline on a plan dumped by `galvatron-fx search` (or a Galvatron strategy file, with --world-size).
Predictions come from a cost model when --cluster or --hardware-profile is given, else from the plan's own
prediction and the model's annotations.

example: galvatron-fx viz gpt2 --plan plan.json --out viz/ --cluster A100-80GB --memory-budget 16GiB"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from galvatron_fx.models import MODELS, build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help=f"a built-in model ({', '.join(sorted(MODELS))}) or an entry point "
        "'module:function' / 'file.py:function' returning (model, example_kwargs)",
    )
    parser.add_argument(
        "--plan", required=True, help="plan JSON (galvatron-fx search, Plan.save) or a Galvatron strategy file"
    )
    parser.add_argument(
        "--out",
        default="viz",
        help="output directory (files are named after the model), or a file name whose suffix is replaced per format",
    )
    parser.add_argument("--format", default="html,onnx,dot", help="comma-separated subset of html, onnx, dot")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="devices a Galvatron strategy file was made for (our plan JSON records it)",
    )
    parser.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron-SP on every tensor-parallel layer of the plan (Galvatron's --sequence_parallel, which "
        "its strategy files do not record)",
    )
    parser.add_argument(
        "--size", choices=("small", "real"), default="small", help="built-in models: configuration size"
    )
    parser.add_argument("--batch", type=int, default=4, help="example batch size to capture with")
    parser.add_argument("--seq", type=int, default=32, help="example sequence length for text models")
    parser.add_argument(
        "--cluster",
        default=None,
        help="price the plan with a cost model for this device preset (e.g. "
        "A100-80GB, H100-80GB) or cluster JSON; nodes × devices follow the plan's world size",
    )
    parser.add_argument("--devices-per-node", type=int, default=8, help="with a --cluster preset: devices per node")
    parser.add_argument(
        "--hardware-profile",
        default=None,
        help="hardware profile JSON (galvatron-fx profile-hardware) for the cost model",
    )
    parser.add_argument(
        "--model-profile",
        default=None,
        help="model profile JSON (galvatron-fx profile-model); default: analytic, from the captured graph's FLOPs",
    )
    parser.add_argument(
        "--mixed-precision", choices=("fp32", "bf16"), default="fp32", help="training precision the cost model prices"
    )
    parser.add_argument(
        "--memory-budget",
        default=None,
        help='per-device budget drawn against stage memory, e.g. "16GiB" '
        "(default: the plan's recorded budget, else the device memory)",
    )


def _cost_model(args: argparse.Namespace, program, world_size: int):
    """The CostModel the options ask for, or None (predictions then come from the plan)."""
    if args.cluster is None and args.hardware_profile is None:
        return None
    from galvatron_fx.cluster import Cluster
    from galvatron_fx.cost.hardware import HardwareProfile
    from galvatron_fx.cost.model import CostModel
    from galvatron_fx.cost.model_profile import ModelProfile

    if args.hardware_profile is not None:
        hardware = HardwareProfile.load(args.hardware_profile, world_size=world_size)
    elif Path(args.cluster).suffix == ".json":
        hardware = Cluster.load(args.cluster).hardware_profile()
    else:
        per_node = min(args.devices_per_node, world_size)
        hardware = Cluster.preset(
            args.cluster, nodes=max(world_size // per_node, 1), devices_per_node=per_node
        ).hardware_profile()
    dtype = "bf16" if args.mixed_precision == "bf16" else "fp32"
    if args.model_profile is not None:
        profile = ModelProfile.load(args.model_profile, device=hardware.device)
    else:
        profile = ModelProfile.from_program(
            program, flops_per_s=hardware.sustained_flops(dtype), dtype=dtype, device=hardware.device
        )
    return CostModel(profile, hardware, mixed_precision=args.mixed_precision)


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.capture import capture
    from galvatron_fx.plan import Plan
    from galvatron_fx.plan_sources import with_sequence_parallel
    from galvatron_fx.units import parse_bytes
    from galvatron_fx.viz import parse_formats, visualize

    formats = parse_formats(args.format)
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    plan = Plan.load(args.plan, world_size=args.world_size)
    if args.sequence_parallel:
        plan = with_sequence_parallel(plan)
    model, example_kwargs = build_model(args.model, size=args.size, batch=args.batch, seq=args.seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = capture(model, example_kwargs=example_kwargs)
    cost_model = _cost_model(args, program, plan.world_size)
    written = visualize(program, plan, args.out, cost_model=cost_model, formats=formats, memory_budget_bytes=budget)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0
