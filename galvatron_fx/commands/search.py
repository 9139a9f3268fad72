"""Search the hybrid-parallel plan with the highest throughput under a memory budget, offline and without
GPUs: describe the model (a built-in name planned at its real size on the meta device, an HF config.json,
an entry point, or Galvatron's profile files) and the cluster (a preset, a size like 2x8, or a cluster JSON);
get a plan JSON and a table of the strategy per run of equal layers, with memory and time per stage."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from galvatron_fx.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", help="built-in model name, HF config.json path, or entry point 'module:function'"
    )
    parser.add_argument(
        "--galvatron-profiles", metavar="DIR", help="Galvatron's profile folder: model and hardware from its files"
    )
    parser.add_argument("--size", choices=("small", "real"), default="real", help="built-in models: configuration size")
    parser.add_argument(
        "--cluster", default="A100-80GB:1x8", help="preset[:NODESxGPUS], a size NODESxGPUS, or a cluster JSON"
    )
    parser.add_argument(
        "--memory",
        default=None,
        help='memory budget per device, e.g. "36GB" (default: the device memory less max(2 GiB, 10%%), '
        "for the CUDA context, NCCL buffers and fragmentation)",
    )
    parser.add_argument("--batch", type=int, default=None, help="fixed global batch")
    parser.add_argument(
        "--batch-range", nargs=3, type=int, metavar=("MIN", "MAX", "STEP"), help="global batches to try"
    )
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=None, help="micro-batch counts to try (default: every divisor)"
    )
    parser.add_argument("--seq", type=int, default=1024, help="sequence length for built-in and HF models")
    parser.add_argument("--space", default="full", help="full, 3d, dp+tp, dp+pp, dp, sdp, tp or pp")
    parser.add_argument("--pipeline", choices=("1f1b", "gpipe", "both"), default="both")
    parser.add_argument("--dp-types", default="ddp,zero2,zero3", help="allowed data-parallel types")
    parser.add_argument(
        "--sp-types", default="none,megatron,ulysses", help="allowed sequence-parallel kinds for TP groups"
    )
    parser.add_argument("--max-tp", type=int, default=1 << 30)
    parser.add_argument("--max-pp", type=int, default=1 << 30)
    for name in ("dp", "tp", "pp", "ckpt", "vtp", "tp-consec", "tp-strided"):
        parser.add_argument(f"--disable-{name}", action="store_true")
    parser.add_argument(
        "--mixed-precision", choices=("fp32", "bf16"), default="bf16", help="training precision to price (GPUs: bf16)"
    )
    parser.add_argument("--out", default="plan.json", help="where to write the plan JSON")
    parser.add_argument("--explain", action="store_true", help="say why the winner beats the best uniform plan")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.passes.search.engine import search
    from galvatron_fx.passes.search.report import explain
    from galvatron_fx.report import plan_table

    cost_model, world_size, budget, names = _cost_model(args)
    space = _space(args)
    plan = search(
        cost_model,
        world_size,
        budget,
        space,
        progress=None if args.quiet else _Progress(),
        provenance={"model": names[0], "cluster": names[1]},
    )
    plan.save(args.out)
    print(plan_table(plan, cost_model))
    print(f"plan written to {args.out} (search {plan.provenance['search_time_s']:.2f} s)")
    if args.explain:
        print(explain(plan, cost_model, budget, space))
    return 0


def _space(args):
    from galvatron_fx.passes.search.space import SearchSpace

    if args.batch_range:
        batch = tuple(args.batch_range)
    elif args.batch:
        batch = (args.batch, args.batch, 1)
    else:
        batch = (8, 8, 1)
    options = dict(
        global_batch=batch,
        chunks=tuple(args.chunks) if args.chunks else None,
        pipelines=("1f1b", "gpipe") if args.pipeline == "both" else (args.pipeline,),
        dp_types=tuple(args.dp_types.split(",")),
        sp_types=tuple(args.sp_types.split(",")),
        max_tp=args.max_tp,
        max_pp=args.max_pp,
        disable_ckpt=args.disable_ckpt,
        disable_vtp=args.disable_vtp,
        disable_dp=args.disable_dp,
        disable_tp_consec=args.disable_tp_consec,
        disable_tp_strided=args.disable_tp_strided,
    )
    if args.disable_tp:
        options["disable_tp"] = True
    if args.disable_pp:
        options["disable_pp"] = True
    return SearchSpace.named(args.space, **options)


def _cost_model(args):
    """(CostModel, world size, budget, (model name, cluster name)) from the command line."""
    from galvatron_fx.cost.model import CostModel

    if args.galvatron_profiles:
        from galvatron_fx.cost.galvatron_import import load_hardware, load_model

        folder = Path(args.galvatron_profiles)
        hardware = load_hardware(folder, memory_bytes=args.memory)
        profile = load_model(folder)
        budget = args.memory or hardware.memory_bytes
        return (
            CostModel(profile, hardware, mixed_precision=args.mixed_precision),
            hardware.world_size,
            budget,
            (f"galvatron:{folder.name}", f"galvatron profiles {folder.name}"),
        )
    if not args.model:
        raise ConfigError(
            "no model given", "name a built-in model, an HF config.json, an entry point, or --galvatron-profiles DIR"
        )
    cluster = _cluster(args.cluster)
    program, name = _program(args.model, args.seq, args.size)
    from galvatron_fx.compile import build_cost_model

    return (
        build_cost_model(program, cluster, "analytic", args.mixed_precision),
        cluster.world_size,
        args.memory or cluster.default_budget_bytes,
        (name, f"{cluster.nodes}x{cluster.devices_per_node} {cluster.device}"),
    )


def _cluster(spec: str):
    from galvatron_fx.cluster import Cluster

    if spec.endswith(".json"):
        return Cluster.load(spec)
    preset, _, size = spec.rpartition(":") if ":" in spec else ("", "", spec)
    if "x" in size.lower() and size.lower().replace("x", "").isdigit():
        nodes, per_node = (int(v) for v in size.lower().split("x"))
        return Cluster.preset(preset or "A100-80GB", nodes=nodes, devices_per_node=per_node)
    return Cluster.preset(spec)


def _program(model: str, seq: int, size: str = "real"):
    """Capture the model without memory (meta device), batch 2; built-in models at ``size``."""
    import torch

    from galvatron_fx.capture import capture
    from galvatron_fx.models import build_model

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model.endswith(".json"):
            import transformers

            config = transformers.AutoConfig.from_pretrained(model)
            net = transformers.AutoModelForCausalLM.from_config(config)
            ids = torch.zeros(2, seq, dtype=torch.long)
            kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
        else:
            net, kwargs = build_model(model, size=size, batch=2, seq=seq)
        program = capture(net, example_kwargs=kwargs)
    return program, program.model_name  # the model's class, which compile() checks a plan against


class _Progress:
    """A one-line progress display on stderr for searches that take a while."""

    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, best: float) -> None:
        if time.perf_counter() - self.started < 1.0 and done < total:
            return
        bar = "#" * (30 * done // max(total, 1))
        sys.stderr.write(f"\rsearch [{bar:<30}] {done}/{total} settings, best {best:.3f} samples/s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
