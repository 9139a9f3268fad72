"""Profile a model's layer types — forward and backward time against micro-batch size and sequence length,
parameters and activation memory — and write a model profile (JSON). --mode measured runs each layer
type's own graph here, and with --in-place N also lowered for each TP degree on N processes at once;
--mode analytic prices FLOPs at a cluster's sustained throughput, for hardware that is not at hand. It prints
each part's times (ms), parameters and activations per sample, and the command to run next: search with this
profile and the hardware profile where one is at hand, else profile-hardware first. The profile records the
model's name and --size, which search takes when its own --size is left out.

--profile-mode, as Galvatron's: static (one micro-batch size at one sequence length), batch (several batch
sizes at one length: time linear in the batch) or sequence (several lengths: time with linear terms for the
projections and MLP and a quadratic one for attention, memory fitted per length, so that search prices other
lengths, with a warning outside the profiled range). Left out, it follows --batches and --seqs (--mode analytic:
batch, at the largest of --seqs); the file records the mode and the measured points."""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from pathlib import Path

from galvatron_fx.errors import ConfigError, ProfileError
from galvatron_fx.models import MODELS, build_model
from galvatron_fx.profile_report import HARDWARE_FILE, find_profile, model_summary, search_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help=f"a built-in model ({', '.join(sorted(MODELS))}) or an entry point 'module:function'"
    )
    parser.add_argument(
        "--size", choices=("small", "real"), default="small", help="built-in models: configuration size"
    )
    parser.add_argument(
        "--mode", choices=("measured", "analytic"), default="measured", help="measure here, or FLOPs ÷ throughput"
    )
    parser.add_argument(
        "--profile-mode",
        choices=("static", "batch", "sequence"),  # cost.time_formula.PROFILE_MODES, not imported for --help
        default=None,
        help="static: one batch size and one sequence length; batch: several batch sizes (time linear in the "
        "batch); sequence: several sequence lengths (time and memory fitted against the length, so other "
        "lengths are priced too). Default: from --batches and --seqs",
    )
    parser.add_argument(
        "--batches",
        default=None,
        help="micro-batch sizes to measure (default: 4 in static mode, else 2,4,8)",
    )
    parser.add_argument(
        "--seqs",
        default=None,
        help="sequence lengths to measure (text models); the largest is the reference (default: 32,64 in "
        "sequence mode and when no mode is given, else 64)",
    )
    parser.add_argument(
        "--cluster", default="A100-80GB", help="analytic mode: a device preset name or a cluster JSON file"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="bf16", help="analytic mode: training precision to price"
    )
    parser.add_argument(
        "--device", default="cpu", help='measured mode: where to run the layers ("cpu", "cuda", "cuda:1")'
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured mode: timed repetitions (median taken)")
    parser.add_argument(
        "--compile-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measured mode: time the layers torch.compile'd, as training runs them (default: on CUDA)",
    )
    parser.add_argument(
        "--in-place",
        default="",
        metavar="N[,N...]",
        help="measured mode: also time each layer type on N processes at once, per TP degree "
        "(collectives and contention included), for plans on N devices of this machine",
    )
    parser.add_argument("--out", default="model_profile.json", help="the profile file to write (replaced if it exists)")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not a comma-separated list of integers", f'write e.g. {option} "2,4,8"'
        ) from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} {text!r} has no positive values", f'write e.g. {option} "2,4,8"')
    return values


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.capture import capture
    from galvatron_fx.cluster import Cluster
    from galvatron_fx.cost.in_place_profiler import measure_in_place
    from galvatron_fx.cost.layer_profiler import profile_model
    from galvatron_fx.cost.model_profile import ModelProfile, analytic_sequence_profile
    from galvatron_fx.cost.time_formula import resolve_profile_mode
    from galvatron_fx.runtime.groups import default_backend

    default_batches = "4" if args.profile_mode == "static" else "2,4,8"
    default_seqs = "32,64" if args.profile_mode in (None, "sequence") else "64"
    batches = _ints(args.batches or default_batches, "--batches")
    seqs = _ints(args.seqs or default_seqs, "--seqs")
    resolve_profile_mode(args.profile_mode, batches, seqs)  # refused before anything is measured
    in_place_worlds = _ints(args.in_place, "--in-place") if args.in_place else []
    if in_place_worlds and args.mode != "measured":
        raise ConfigError(
            "--in-place times layers here, which analytic mode does not", "drop --in-place, or use --mode measured"
        )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.mode == "measured":
            build = functools.partial(build_model, args.model, args.size)
            profile = profile_model(
                build,
                batches,
                seqs,
                profile_mode=args.profile_mode,
                device=args.device,
                repeats=args.repeats,
                progress=not args.no_progress,
                name=args.model,
                compile_layers=args.device.startswith("cuda") if args.compile_layers is None else args.compile_layers,
            )
            for world in in_place_worlds:
                measure_in_place(
                    profile,
                    build,
                    world,
                    repeats=args.repeats,
                    backend=default_backend(),
                    progress=not args.no_progress,
                )
        else:
            cluster = (
                Cluster.load(args.cluster) if Path(args.cluster).suffix == ".json" else Cluster.preset(args.cluster)
            )
            flops = cluster.sustained_flops.get(args.dtype)
            if not flops:
                raise ConfigError(
                    f"cluster {args.cluster} has no sustained throughput for {args.dtype}", "add it to the cluster JSON"
                )
            # FLOPs ÷ throughput at each length captured (sequence mode), else at the largest
            by_seq = {}
            for seq in sorted(set(seqs)) if args.profile_mode == "sequence" else [max(seqs)]:
                model, kwargs = build_model(args.model, size=args.size, batch=max(min(batches), 2), seq=seq)
                part = ModelProfile.from_program(
                    capture(model, example_kwargs=kwargs),
                    flops_per_s=flops,
                    dtype=args.dtype,
                    device=cluster.device,
                    name=args.model,
                )
                by_seq[part.seq_length] = part
            if len(by_seq) == 1 and args.profile_mode == "sequence":
                raise ProfileError(
                    f"the model's sequence length is {sorted(by_seq)} at every length of --seqs",
                    "profile it in batch mode (its inputs do not follow --seqs: e.g. an image model)",
                )
            profile = analytic_sequence_profile(by_seq, flops) if len(by_seq) > 1 else by_seq[max(by_seq)]
            if len(by_seq) == 1:
                profile.profile_mode = args.profile_mode or "batch"  # FLOPs ÷ throughput: linear in the batch
    if args.model in MODELS:
        profile.extra["size"] = args.size  # search takes it: the layers and widths it was profiled at
    replaced = Path(args.out).exists()
    profile.save(args.out)
    how = " ".join(filter(None, (args.mode, f"on {profile.device}" if profile.device else "")))
    kinds = len(profile.types)
    print(
        f"wrote {args.out}{' (replacing the file there)' if replaced else ''}: {args.model} ({how}, {profile.dtype}), "
        f"{len(profile.layer_types)} body layers of {kinds} type{'s' if kinds != 1 else ''}, "
        f"sequence length {profile.seq_length}, in {time.perf_counter() - start:.1f} s"
    )
    print(f"  {_mode_line(profile)}")
    print("\n".join(model_summary(profile, max(batches))))
    _next(args, in_place_worlds)
    return 0


def _mode_line(profile) -> str:
    """The profile mode in words, with the points measured."""
    batches = ",".join(str(b) for b in profile.profiled_batches) or "any (FLOPs)"
    seqs = ",".join(str(s) for s in profile.profiled_seqs)
    if profile.profile_mode == "sequence":
        low, high = profile.seq_range()
        return (
            f"profile mode sequence: batches {batches} at sequence lengths {seqs}; prices any length "
            f"(search warns outside {low}..{high})"
        )
    what = "time linear in the batch" if profile.profile_mode == "batch" else "time proportional to the batch"
    return (
        f"profile mode {profile.profile_mode}: batches {batches} at sequence length {profile.seq_length} ({what}); "
        "search refuses other lengths"
    )


def _next(args: argparse.Namespace, in_place_worlds: list[int]) -> None:
    """Print the command to run next: search with both profiles, or profile-hardware first where no hardware
    profile is at hand (a measured model profile needs one: the datasheet cluster is another device)."""
    from galvatron_fx.cost.hardware import HardwareProfile

    path = find_profile("hardware", args.out)
    try:
        hardware = HardwareProfile.load(path) if path is not None else None
    except ProfileError:
        hardware = None
    size = args.size if args.model in MODELS else ""
    if hardware is not None:
        print(f"next: {search_command(args.model, path, args.out, size)}")
    elif args.mode == "measured":
        nprocs = max(in_place_worlds, default=2)
        print(f"next: galvatron-fx profile-hardware --nprocs {nprocs} --out {HARDWARE_FILE}")
        print(f"then: {search_command(args.model, HARDWARE_FILE, args.out, size)}")
    else:
        print(f"next: {search_command(args.model, None, args.out, size)} --cluster {args.cluster}")
