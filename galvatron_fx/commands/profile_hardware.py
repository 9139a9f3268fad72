"""Measure the collectives, pipeline send/recv and compute/communication overlap of this cluster and write
a hardware profile (JSON). Under torchrun it profiles the launched processes; otherwise it starts --nprocs
local processes itself. With --preset it writes a profile from datasheet figures instead, for a cluster
that is not at hand. It prints what it measured (µs, GB/s) and the command to run next: profile-model, or
search with both profiles where a model profile is at hand. --sizes and --repeats make a quick, rough pass
(e.g. --sizes 16KiB,64KiB --repeats 1)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from galvatron_fx.errors import ConfigError
from galvatron_fx.profile_report import MODEL_FILE, find_profile, hardware_summary, search_command
from galvatron_fx.units import parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="hardware_profile.json", help="the profile file to write (replaced if it exists)"
    )
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

    replaced = Path(args.out).exists()
    if args.preset:
        from galvatron_fx.cluster import Cluster

        profile = Cluster.preset(args.preset, args.nodes, args.devices_per_node, args.memory).hardware_profile()
        profile.save(args.out)
        _report(args.out, profile, f"datasheet figures of {args.preset}, {profile.world_size} devices", replaced)
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
    seconds = time.perf_counter() - start
    what = f"{profile.world_size} {profile.backend} processes on {profile.device}, measured in {seconds:.1f} s"
    _report(args.out, profile, what, replaced)
    return 0


def _report(out: str, profile, what: str, replaced: bool) -> None:
    """Print what the profile written to ``out`` holds, in readable units, and the command to run next."""
    print(f"wrote {out}{' (replacing the file there)' if replaced else ''}: {what}")
    print("\n".join(hardware_summary(profile)))
    from galvatron_fx.cost.model_profile import ModelProfile
    from galvatron_fx.errors import ProfileError

    path = find_profile("model", out)
    try:
        model_profile = ModelProfile.load(path) if path is not None else None
    except ProfileError:
        model_profile = None
    if model_profile is not None:
        name, size = model_profile.name or "MODEL", model_profile.extra.get("size", "")
        print(f"next: {search_command(name, out, path, size)}")
    else:
        print(f"next: galvatron-fx profile-model MODEL --out {MODEL_FILE}")
        print(f"then: {search_command('MODEL', out, MODEL_FILE)}")
