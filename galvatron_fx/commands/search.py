"""Search the hybrid-parallel plan with the highest throughput under a memory budget, offline and without
GPUs: describe the model (a built-in name planned at its real size on the meta device, a size preset in
Galvatron's names such as llama-70b or bert-large, an HF config.json, an entry point, or Galvatron's profile
files) and the cluster (a preset, a size like 2x8, or a cluster JSON); get a plan JSON and a table of the
strategy per run of equal layers, with memory and time per stage. Galvatron's search options keep their
meaning: --space, --dp-types, --disable-sdp and the other --disable-* switches, --fine-grained-mode,
--sequence-parallel, --pipeline pipedream_flush.

Priced from datasheet figures and the graph's FLOPs, or from this project's own measurements:
--hardware-profile (galvatron-fx profile-hardware; it gives the cluster too when --cluster is left out) and
--model-profile (galvatron-fx profile-model; it gives the sequence length, the size and, measured, the
precision when --seq, --size and --mixed-precision are left out). A profile made for another cluster, model,
sequence length or precision is refused. The plan's provenance records what it was searched for: sequence
length, precision, cluster, and each profile file with its sha256."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from galvatron_fx.errors import ConfigError

DEFAULT_CLUSTER = "A100-80GB:1x8"
DEFAULT_SEQ = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from galvatron_fx.models import MODELS, PRESETS

    parser.add_argument(
        "model",
        nargs="?",
        help=f"built-in model ({', '.join(sorted(MODELS))}), size preset ({', '.join(PRESETS)}), "
        "HF config.json path, or entry point 'module:function'",
    )
    parser.add_argument(
        "--galvatron-profiles", metavar="DIR", help="Galvatron's profile folder: model and hardware from its files"
    )
    parser.add_argument(
        "--hardware-profile", metavar="FILE", help="measured collectives, p2p, overlap (galvatron-fx profile-hardware)"
    )
    parser.add_argument(
        "--model-profile", metavar="FILE", help="measured layer times and memory (galvatron-fx profile-model)"
    )
    parser.add_argument(
        "--size",
        choices=("small", "real"),
        default=None,
        help="plain built-in names: configuration size (default: the model profile's, else real)",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        metavar="N",
        help="size presets: N layers instead of the published count",
    )
    parser.add_argument(
        "--cluster",
        default=None,
        help="preset[:NODESxGPUS], a size NODESxGPUS, or a cluster JSON (default: the hardware profile's cluster, "
        f"else {DEFAULT_CLUSTER})",
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
    parser.add_argument(
        "--seq",
        type=int,
        default=None,
        help=f"sequence length for built-in and HF models (default: the model profile's, else {DEFAULT_SEQ}); "
        "with a sequence-mode profile (ours or Galvatron's) any length, with a warning outside the profiled range",
    )
    parser.add_argument("--space", default="full", help="full, 3d, dp+tp, dp+pp, dp, sdp, tp or pp")
    parser.add_argument(
        "--pipeline",
        choices=("1f1b", "pipedream_flush", "gpipe", "both"),
        default="both",
        help="pipeline schedule (pipedream_flush: Galvatron's name for 1f1b)",
    )
    parser.add_argument("--dp-types", default="ddp,zero2,zero3", help="allowed data-parallel types")
    parser.add_argument(
        "--sp-types", default="none,megatron,ulysses", help="allowed sequence-parallel kinds for TP groups"
    )
    parser.add_argument(
        "--tp-modes",
        default="1d,2d,2.5d,3d",
        help="how a layer's tp ranks may split it: 1d (Megatron), 2d, 2.5d, 3d grids (per layer, like tp degrees)",
    )
    parser.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron-SP on every tensor-parallel layer (Galvatron's --sequence_parallel): TP without SP is left out",
    )
    parser.add_argument(
        "--fine-grained-mode",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: a strategy per layer; 0: one strategy for every layer (Galvatron's fine_grained_mode)",
    )
    parser.add_argument("--max-tp", type=int, default=1 << 30)
    parser.add_argument("--max-pp", type=int, default=1 << 30)
    for name in ("dp", "sdp", "tp", "pp", "ckpt", "vtp", "tp-consec", "tp-strided"):
        parser.add_argument(
            f"--disable-{name}",
            action="store_true",
            help="no ZeRO of any kind (Galvatron's disable_sdp)" if name == "sdp" else None,
        )
    parser.add_argument(
        "--mixed-precision",
        choices=("fp32", "bf16"),
        default=None,
        help="training precision to price (default: a measured model profile's, else bf16, as on GPUs)",
    )
    parser.add_argument("--out", default="plan.json", help="where to write the plan JSON")
    parser.add_argument("--explain", action="store_true", help="say why the winner beats the best uniform plan")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.passes.search.engine import search
    from galvatron_fx.passes.search.report import explain
    from galvatron_fx.report import plan_table

    cost_model, world_size, budget, provenance = _cost_model(args)
    space = _space(args)
    plan = search(
        cost_model, world_size, budget, space, progress=None if args.quiet else _Progress(), provenance=provenance
    )
    plan.save(args.out)
    print(plan_table(plan, cost_model))
    print(f"priced from {_sources(plan.provenance)}")
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
    sp_types = tuple(args.sp_types.split(","))
    if args.sequence_parallel:
        sp_types = tuple(dict.fromkeys("megatron" if t == "none" else t for t in sp_types))
    options = dict(
        global_batch=batch,
        chunks=tuple(args.chunks) if args.chunks else None,
        pipelines=("1f1b", "gpipe") if args.pipeline == "both" else (args.pipeline,),
        dp_types=tuple(args.dp_types.split(",")),
        sp_types=sp_types,
        tp_modes=_tp_modes(args.tp_modes),
        max_tp=args.max_tp,
        max_pp=args.max_pp,
        disable_ckpt=args.disable_ckpt,
        disable_vtp=args.disable_vtp,
        disable_dp=args.disable_dp,
        disable_sdp=args.disable_sdp,
        disable_tp_consec=args.disable_tp_consec,
        disable_tp_strided=args.disable_tp_strided,
    )
    # switches that only restrict: a named space that already sets one keeps it when the flag is absent
    for flag, field in (
        (args.disable_tp, "disable_tp"),
        (args.disable_pp, "disable_pp"),
        (not args.fine_grained_mode, "uniform"),
    ):
        if flag:
            options[field] = True
    return SearchSpace.named(args.space, **options)


def _tp_modes(text: str) -> tuple[str, ...]:
    """``--tp-modes``: comma-separated names of ``plan.TP_MODES``."""
    from galvatron_fx.errors import ConfigError
    from galvatron_fx.plan import TP_MODES

    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in TP_MODES]
    if bad or not modes:
        raise ConfigError(
            f"--tp-modes {text!r} names {bad or 'no mode'}",
            f"give a comma-separated subset of {', '.join(TP_MODES)} (e.g. --tp-modes 1d,2d)",
        )
    return modes


def _cost_model(args):
    """(CostModel, world size, budget, provenance) from the command line."""
    from galvatron_fx.cost.model import CostModel
    from galvatron_fx.cost.profile_checks import file_sha256, load_hardware_profile, load_model_profile, searched_for

    if args.galvatron_profiles:
        if args.hardware_profile or args.model_profile:
            raise ConfigError(
                "--galvatron-profiles gives the model and hardware profiles already",
                "drop --hardware-profile and --model-profile, or --galvatron-profiles",
            )
        from galvatron_fx.cost.galvatron_import import load_hardware, load_model

        folder = Path(args.galvatron_profiles)
        hardware = load_hardware(folder, memory_bytes=args.memory)
        # --seq: another length than the files' own (their sequence-mode profile; refused for static/batch)
        cost_model = CostModel(
            load_model(folder), hardware, mixed_precision=args.mixed_precision or "bf16", seq=args.seq
        )
        provenance = {
            "model": f"galvatron:{folder.name}",
            "cluster": f"galvatron profiles {folder.name}",
            **searched_for(cost_model),
            "galvatron_profiles": {
                "path": str(folder),
                "sha256": {path.name: file_sha256(path) for path in sorted(folder.glob("*.json"))},
            },
        }
        return cost_model, hardware.world_size, args.memory or hardware.memory_bytes, provenance
    if not args.model:
        raise ConfigError(
            "no model given", "name a built-in model, an HF config.json, an entry point, or --galvatron-profiles DIR"
        )
    from galvatron_fx.compile import build_cost_model

    hardware = load_hardware_profile(args.hardware_profile) if args.hardware_profile else None
    model_profile = load_model_profile(args.model_profile) if args.model_profile else None
    if args.cluster or hardware is None:
        cluster = _cluster(args.cluster or DEFAULT_CLUSTER)
    else:
        cluster = _cluster_of(hardware, args.memory)
    # what the command line leaves out, the model profile says (a measured one: the precision it was timed in)
    seq = args.seq or (model_profile.seq_length if model_profile else DEFAULT_SEQ)
    measured = model_profile is not None and model_profile.mode == "measured"
    precision = args.mixed_precision or (model_profile.dtype if measured else "bf16")
    size = args.size or (model_profile.extra.get("size") if model_profile else None) or "real"
    program, name = _program(args.model, seq, size, args.num_layers)
    cost_model = build_cost_model(program, cluster, model_profile or "analytic", precision, hardware_profile=hardware)
    provenance = {
        "model": name,
        "cluster": f"{cluster.nodes}x{cluster.devices_per_node} {cluster.device}",
        **searched_for(cost_model, profile=args.model_profile, hardware_profile=args.hardware_profile),
    }
    return cost_model, cluster.world_size, args.memory or cluster.default_budget_bytes, provenance


def _cluster_of(hardware, memory: str | None):
    """The cluster a hardware profile was measured on: its processes, device kind and memory per device (links
    and throughput from the device's datasheet, which the profile's measurements replace in the cost model)."""
    from dataclasses import asdict

    from galvatron_fx.cluster import CPU_SPEC, PRESETS, Cluster
    from galvatron_fx.units import parse_bytes

    where = hardware.source or "the hardware profile"
    if hardware.world_size % hardware.devices_per_node:
        raise ConfigError(
            f"{where}: key world_size {hardware.world_size} is not a multiple of key devices_per_node "
            f"{hardware.devices_per_node}",
            "profile the hardware again, or give --cluster",
        )
    memory_bytes = parse_bytes(memory) if memory else hardware.memory_bytes
    if not memory_bytes:
        raise ConfigError(f"{where} does not record key memory_bytes", 'give --memory, e.g. --memory "16GiB"')
    spec = asdict(PRESETS.get(hardware.device, CPU_SPEC))
    del spec["memory_bytes"]
    nodes = hardware.world_size // hardware.devices_per_node
    return Cluster(nodes, hardware.devices_per_node, hardware.device, memory_bytes, **spec)


def _sources(provenance: dict) -> str:
    """Where the search's prices came from, in words."""
    if "galvatron_profiles" in provenance:
        return f"Galvatron's profiles in {provenance['galvatron_profiles']['path']}"
    hardware, model = provenance.get("hardware_profile"), provenance.get("model_profile")
    return (
        (f"hardware profile {hardware['path']}" if hardware else f"datasheet figures ({provenance['cluster']})")
        + (f", model profile {model['path']}" if model else ", the graph's FLOPs")
        + f"; sequence length {provenance['seq']}, {provenance['mixed_precision']}"
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


def _program(model: str, seq: int, size: str = "real", num_layers: int | None = None):
    """Capture the model without memory (meta device), batch 2; plain built-in names at ``size``, size presets
    with ``num_layers`` layers where given."""
    import torch

    from galvatron_fx.capture import capture
    from galvatron_fx.models import PRESETS, build_model, build_preset

    if num_layers is not None and model not in PRESETS:
        raise ConfigError(
            f"--num-layers applies to the size presets, not to {model!r}", f"use one of {', '.join(PRESETS)}"
        )

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model.endswith(".json"):
            import transformers

            config = transformers.AutoConfig.from_pretrained(model)
            net = transformers.AutoModelForCausalLM.from_config(config)
            ids = torch.zeros(2, seq, dtype=torch.long)
            kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
        elif num_layers is not None:
            net, kwargs = build_preset(model, batch=2, seq=seq, num_layers=num_layers)
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
