"""Profile a model's layer types — forward and backward time against micro-batch size and sequence length,
parameters and activation memory — and write a model profile (JSON). --mode measured runs each layer
type's own graph here, and with --in-place N also lowered for each TP degree on N processes at once;
--mode analytic prices FLOPs at a cluster's sustained throughput, for hardware that is not at hand."""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from pathlib import Path

from galvatron_fx.errors import ConfigError
from galvatron_fx.models import MODELS, build_model


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
    parser.add_argument("--batches", default="2,4,8", help="micro-batch sizes to measure (each ≥ 2)")
    parser.add_argument(
        "--seqs", default="32,64", help="sequence lengths to measure (text models); the largest is the reference"
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
    parser.add_argument("--out", default="model_profile.json", help="where to write the profile")
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
    from galvatron_fx.cost.model_profile import ModelProfile
    from galvatron_fx.runtime.groups import default_backend

    batches, seqs = _ints(args.batches, "--batches"), _ints(args.seqs, "--seqs")
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
            model, kwargs = build_model(args.model, size=args.size, batch=max(min(batches), 2), seq=max(seqs))
            flops = cluster.sustained_flops.get(args.dtype)
            if not flops:
                raise ConfigError(
                    f"cluster {args.cluster} has no sustained throughput for {args.dtype}", "add it to the cluster JSON"
                )
            profile = ModelProfile.from_program(
                capture(model, example_kwargs=kwargs),
                flops_per_s=flops,
                dtype=args.dtype,
                device=cluster.device,
                name=args.model,
            )
    profile.save(args.out)
    print(
        f"wrote {args.out}: {args.model} ({args.mode}), {len(profile.types)} layer types, {len(profile.layer_types)} "
        "body layers, "
        f"seq {profile.seq_length}, in {time.perf_counter() - start:.1f}s"
    )
    for name, layer in profile.types.items():
        print(
            f"  {name:<20} fwd {layer.fwd.expr}  bwd {layer.bwd.expr}  params {layer.param_count}  "
            f"act/sample {layer.activation_bytes_per_sample[1]} B"
        )
        for world, by_tp in layer.in_place_times.items():
            print(
                "    in place on {} processes: {}".format(
                    world, "; ".join(f"tp {tp} fwd {fwd.expr} bwd {bwd.expr}" for tp, (fwd, bwd) in by_tp.items())
                )
            )
    return 0
