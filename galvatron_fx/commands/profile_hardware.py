"""Measure the collectives, pipeline send/recv and compute/communication overlap of this cluster and write
a hardware profile (JSON). Under torchrun it profiles the launched processes; otherwise it starts --nprocs
local processes itself. With --preset it writes a profile from datasheet figures instead, for a cluster
that is not at hand."""

from __future__ import annotations

import argparse
import os
import time

from galvatron_fx.errors import ConfigError
from galvatron_fx.units import format_bytes, parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="hardware_profile.json", help="where to write the profile")
    parser.add_argument("--nprocs", type=int, default=2, help="processes to start when not under torchrun")
    parser.add_argument(
        "--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with GPUs, else gloo"
    )
    parser.add_argument(
        "--sizes", default=None, help='message sizes, e.g. "64KiB,512KiB,2MiB" (default depends on the device)'
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per measurement (median taken)")
    parser.add_argument(
        "--preset", default=None, help="write a datasheet profile for this device kind instead of measuring"
    )
    parser.add_argument("--nodes", type=int, default=1, help="with --preset: number of nodes")
    parser.add_argument("--devices-per-node", type=int, default=8, help="with --preset: devices per node")
    parser.add_argument("--memory", default=None, help='with --preset: memory per device, e.g. "36GB"')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, device):
    from galvatron_fx.cost.hardware_profiler import ProfilerConfig

    config = ProfilerConfig.for_device(device, progress=not args.no_progress)
    changes = {}
    if args.sizes:
        changes["sizes_bytes"] = tuple(sorted(parse_bytes(s) for s in args.sizes.split(",") if s.strip()))
    if args.repeats is not None:
        if args.repeats < 1:
            raise ConfigError(f"--repeats {args.repeats} is not positive", "give at least 1")
        changes["repeats"] = args.repeats
    return ProfilerConfig(**{**config.__dict__, **changes})


def profile_and_save(out: str, args_dict: dict) -> None:
    """Body of every rank: profile, and rank 0 writes ``out``."""
    import torch
    import torch.distributed as dist

    from galvatron_fx.cost.hardware_profiler import profile_hardware

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    profile = profile_hardware(_config(argparse.Namespace(**args_dict), device), device)
    if profile is not None:
        profile.save(out)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.preset:
        from galvatron_fx.cluster import Cluster

        profile = Cluster.preset(args.preset, args.nodes, args.devices_per_node, args.memory).hardware_profile()
        profile.save(args.out)
        print(f"wrote {args.out}: preset {args.preset}, {profile.world_size} devices")
        return 0
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl needs GPUs, and none is visible", "use --backend gloo on CPU")
    start = time.perf_counter()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.set_num_threads(1)
        dist.init_process_group(backend)
        try:
            profile_and_save(args.out, vars(args) | {"handler": None})
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        from galvatron_fx.cost.hardware_profiler import launch_local

        if args.nprocs < 1:
            raise ConfigError(f"--nprocs {args.nprocs} is not positive", "give at least 1")
        launch_local(profile_and_save, args.nprocs, backend, (args.out, vars(args) | {"handler": None}))
    from galvatron_fx.cost.hardware import HardwareProfile

    profile = HardwareProfile.load(args.out)
    fit = profile.fit("all_reduce", 2) if profile.world_size > 1 else None
    summary = f", all-reduce over 2: {fit.latency_s * 1e6:.0f} us + {format_bytes(fit.bandwidth_Bps)}/s" if fit else ""
    print(
        f"wrote {args.out}: {profile.world_size} {profile.backend} processes in "
        f"{time.perf_counter() - start:.1f}s{summary}, "
        f"overlap slowdown {profile.overlap_slowdown:.2f}"
    )
    return 0
