"""What the profilers measured, in words and readable units, and the command to run next.

``profile-hardware`` and ``profile-model`` print these after writing their files: latencies in µs, bandwidths
in GB/s, layer times in ms, sizes in KiB/MiB/GiB — never a raw float or a sympy expression — and then the
next step of the chain profile-hardware → profile-model → search → train, naming the files that exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from .units import format_bytes

HARDWARE_FILE = "hardware_profile.json"  # profile-hardware's default --out
MODEL_FILE = "model_profile.json"  # profile-model's default --out


def format_seconds(seconds: float) -> str:
    """``seconds`` in ns, µs, ms or s, three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_rate(bytes_per_s: float) -> str:
    """A bandwidth in GB/s (powers of 1000, as links are quoted)."""
    return f"{bytes_per_s / 1e9:.3g} GB/s"


def format_flops(flops_per_s: float) -> str:
    """A throughput in GFLOP/s or TFLOP/s."""
    return f"{flops_per_s / 1e12:.3g} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.3g} GFLOP/s"


def format_count(count: float) -> str:
    """A parameter count such as ``1.23 M`` or ``850 k``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f}"


def hardware_summary(profile) -> list[str]:
    """One line per measured figure of a HardwareProfile."""
    lines = []
    for key, fit in sorted(profile.collectives.items()):
        op, group, layout = key.split("/")
        lines.append(
            f"  {op:<15} over {group} ({layout}): {format_seconds(fit.latency_s)} + {format_rate(fit.bandwidth_Bps)}"
        )
    for pp, fit in sorted(profile.p2p.items()):
        lines.append(
            f"  {'send/recv':<15} pipeline of {pp}: {format_seconds(fit.latency_s)} + {format_rate(fit.bandwidth_Bps)}"
        )
    for kind, fit in sorted(profile.sharded_units.items()):
        dp_type, group = kind.split("/")
        lines.append(
            f"  {'FSDP2 unit':<15} {dp_type} over {group}: {format_seconds(fit.latency_s)} + "
            f"{format_rate(fit.bandwidth_Bps)} per step"
        )
    for dtype, flops in sorted(profile.flops_per_s.items()):
        lines.append(f"  {'compute':<15} {dtype}: {format_flops(flops)}")
    if profile.op_overhead_s:
        lines.append(f"  {'per operator':<15} {format_seconds(profile.op_overhead_s)} whatever the batch")
    if profile.autocast_cast_s_per_param:
        lines.append(
            f"  {'bf16 casts':<15} {format_seconds(profile.autocast_cast_s_per_param * 1e6)} per million parameters"
        )
    lines.append(
        f"  {'overlap':<15} {profile.overlap_slowdown:.2f}× (1: communication hidden by compute; 2: taking turns)"
    )
    if profile.compute_slowdown > 1.0:
        lines.append(f"  {'compute':<15} {profile.compute_slowdown:.2f}× slower with every process computing at once")
    if profile.optimizer_s_per_param:
        per_param = format_seconds(profile.optimizer_s_per_param)
        lines.append(f"  {'optimizer step':<15} {per_param} per parameter (gradient norm and Adam)")
    for group, skew in sorted(profile.blocking_by_group_s.items()):
        growth = profile.blocking_growth_by_group.get(group, 0.0)
        lines.append(
            f"  {'arrival skew':<15} group of {group}: {format_seconds(skew)} per collective between compute "
            f"(+{format_seconds(growth * 1e-3)} per ms of compute)"
        )
    if profile.memory_bytes:
        lines.append(f"  {'memory':<15} {format_bytes(profile.memory_bytes)} per device")
    return lines


def model_summary(profile, batch: int) -> list[str]:
    """One line per profiled part of a ModelProfile: forward and backward at a micro-batch of ``batch`` and
    the profile's sequence length, parameters, saved activations per sample (and, per world size and TP
    degree, the times measured in place)."""
    seq = profile.seq_length
    parts = {"prologue": profile.prologue, **profile.types, "epilogue": profile.epilogue}
    counts = {name: profile.layer_types.count(name) for name in profile.types}
    lines = [f"  {'part':<24} {'fwd':>10} {'bwd':>10} {'params':>9} {'activations/sample':>19}"]
    for name, part in parts.items():
        label = f"{name} ×{counts[name]}" if name in counts else name
        lines.append(
            f"  {label:<24} {format_seconds(part.fwd(batch, seq)):>10} {format_seconds(part.bwd(batch, seq)):>10} "
            f"{format_count(part.param_count):>9} {format_bytes(part.activation_bytes_per_sample[1]):>19}"
        )
        for world, by_tp in sorted(part.in_place_times.items()):
            times = "; ".join(
                f"tp {tp} fwd {format_seconds(fwd(batch, seq))} bwd {format_seconds(bwd(batch, seq))}"
                for tp, (fwd, bwd) in sorted(by_tp.items())
            )
            lines.append(f"    in place on {world} processes: {times}")
    lines.append(f"  (times of one micro-batch of {batch} samples at sequence length {seq})")
    return lines


def find_profile(kind: str, near: str | Path) -> Path | None:
    """The default-named profile of ``kind`` ("hardware" or "model") in the current folder or beside ``near``,
    if one exists and is such a profile."""
    name = HARDWARE_FILE if kind == "hardware" else MODEL_FILE
    for folder in dict.fromkeys((Path.cwd(), Path(near).resolve().parent)):
        path = folder / name
        try:
            if path.is_file() and json.loads(path.read_text()).get("format", "").startswith(f"galvatron_fx.{kind}_"):
                return path if folder != Path.cwd() else Path(name)
        except (OSError, ValueError, AttributeError):
            continue
    return None


def search_command(model: str, hardware: str | Path | None, model_profile: str | Path | None, size: str = "") -> str:
    """The ``galvatron-fx search`` line for these profiles."""
    parts = ["galvatron-fx search", model]
    if size:
        parts.append(f"--size {size}")
    if hardware:
        parts.append(f"--hardware-profile {hardware}")
    if model_profile:
        parts.append(f"--model-profile {model_profile}")
    return " ".join(parts)
