"""HardwareProfile: what the cost model knows about the devices and the links between them.

Every collective is a fit ``time_s = latency_s + nbytes / bandwidth_Bps`` per (collective, group size,
layout), where ``nbytes`` is the size of the tensor handed to the collective: the buffer for all-reduce
and all-to-all, the gathered output for all-gather, the input for reduce-scatter. ``bandwidth_Bps`` is
therefore an *algorithm* bandwidth (what a user sees), not NCCL's bus bandwidth. Layouts: a
``consecutive`` group holds ranks ``k*g .. k*g+g-1``; a strided one holds ranks ``k, k+w/g, k+2w/g, ...``
(``w`` = world size), as in Galvatron's ``consec_1`` / ``consec_0``; a ``stride<s>`` one holds ranks ``k, k+s,
k+2s, ...`` (the columns and depth groups of a grid-parallel layer; ``cost.grid_tp.group_fit``).

Profiles come from a Cluster preset (datasheet figures), from the hardware profiler, or from Galvatron's
hardware files (cost/galvatron_import.py), and serialise to JSON.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from galvatron_fx.errors import ProfileError

from .fits import AttentionFit as AttentionFit  # also importable from here, as before
from .fits import CommFit as CommFit
from .fits import fit_latency_bandwidth as fit_latency_bandwidth

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
FORMAT = "galvatron_fx.hardware_profile/1"
# the compute between collectives at which the profiler measures the arrival skew (blocking_by_group_s)
BLOCKING_PROBE_COMPUTE_S = 4e-3


def ring_volume_factor(op: str, group: int) -> float:
    """Bytes each rank moves per byte of ``nbytes`` under the ring algorithm (used to rescale fits)."""
    if group <= 1:
        return 0.0
    return 2.0 * (group - 1) / group if op == "all_reduce" else (group - 1) / group


def _is_layout(layout: str) -> bool:
    """``consecutive``, ``strided`` (``world / g`` apart), or ``stride<s>``: ranks ``s`` apart (a grid's columns
    and depth groups, cost/grid_tp.py)."""
    return layout in ("consecutive", "strided") or (
        layout.startswith("stride") and layout[6:].isdigit() and int(layout[6:]) >= 2
    )


def _key(op: str, group: int, consecutive: bool) -> str:
    return f"{op}/{group}/{'consecutive' if consecutive else 'strided'}"


@dataclass
class HardwareProfile:
    """Collective fits, pipeline p2p fits, overlap slowdown, memory and sustained throughput of a cluster.

    ``collectives`` maps ``"<op>/<group>/<consecutive|strided>"`` to a CommFit; ``p2p`` maps a pipeline
    degree to the CommFit of one send/recv between neighbouring stages; ``overlap_slowdown`` (≥ 1) is
    1 + the share of a communication that stays visible while it overlaps compute of the same length
    (1: hidden on a stream of its own; 2: they only take turns, as where gloo shares the cores with
    compute); ``flops_per_s`` is the sustained throughput per dtype ("fp32", "bf16", "fp16");
    ``memory_bytes`` per device.
    ``optimizer_s_per_param``: seconds per parameter the device updates of its gradient-norm pass and
    Adam step (0: not measured); ``compute_slowdown`` (≥ 1): how much slower a process computes while
    every process of the node computes than alone (processes sharing CPU cores; 1 on GPUs), which a layer
    profile timed on one process does not see. ``blocking_collective_s``: what a collective the ranks wait
    for in the middle of compute (tensor parallelism; FSDP without streams) costs beyond its own time, for
    the ranks to arrive together (0 on dedicated devices; the scheduler's time slices where ranks share CPU
    cores), for a group of all ranks; ``blocking_by_group_s`` the same per group size where measured, after
    ``BLOCKING_PROBE_COMPUTE_S`` of compute; ``blocking_growth_by_group`` how much it grows per second of
    compute beyond that (ranks that share cores drift apart as they work; ``blocking_s``).
    ``sharded_units`` maps ``"<zero2|zero3>/<group>"`` to the CommFit of what one FSDP2 unit of ``nbytes``
    of fp32 parameters costs a training step beyond its compute (every gather, reduce-scatter, copy and
    wait), measured where collectives are waited for in place (CPUs); empty elsewhere.
    ``op_overhead_s``: the batch-independent seconds of a training step per operator its forward and backward
    dispatch (launch and dispatch; ``cost/step_probe.py``), and ``autocast_cast_s_per_param`` what bf16
    autocast's weight casts add per parameter cast, both at the contention of ``flops_per_s`` (0: not measured).
    ``attention`` maps ``"<fwd|bwd>/<dtype>"`` to the AttentionFit of the fused attention kernel in that pass
    and dtype, at the same contention (empty: not measured; attention is then priced at ``flops_per_s``).
    """

    world_size: int
    devices_per_node: int
    device: str
    memory_bytes: int | None = None
    collectives: dict[str, CommFit] = field(default_factory=dict)
    p2p: dict[int, CommFit] = field(default_factory=dict)
    overlap_slowdown: float = 1.0
    flops_per_s: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    source: str = ""
    optimizer_s_per_param: float = 0.0
    compute_slowdown: float = 1.0
    blocking_collective_s: float = 0.0
    blocking_by_group_s: dict[int, float] = field(default_factory=dict)
    sharded_units: dict[str, CommFit] = field(default_factory=dict)
    blocking_growth_by_group: dict[int, float] = field(default_factory=dict)
    op_overhead_s: float = 0.0
    autocast_cast_s_per_param: float = 0.0
    attention: dict[str, AttentionFit] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------------
    def fit(self, op: str, group: int, consecutive: bool = True) -> CommFit:
        """The fit for ``op`` on ``group`` ranks; a missing size is rescaled from the nearest measured one."""
        if op not in COLLECTIVES:
            raise ValueError(f"unknown collective {op!r}")
        for layout in (consecutive, not consecutive):
            if _key(op, group, layout) in self.collectives:
                return self.collectives[_key(op, group, layout)]
        measured = [
            (int(k.split("/")[1]), v)
            for k, v in self.collectives.items()
            if k.startswith(op + "/") and k.split("/")[2] in ("consecutive", "strided")
        ]
        if (
            not measured
            and op in ("all_gather", "reduce_scatter")
            and any(k.startswith("all_reduce/") for k in self.collectives)
        ):
            # all-gather and reduce-scatter are each half of a ring all-reduce
            base = self.fit("all_reduce", group, consecutive)
            return CommFit(base.latency_s / 2, base.bandwidth_Bps * 2)
        if not measured:
            raise ProfileError(
                f"hardware profile {self.source or '(in memory)'} has no key collectives/{op}",
                "profile the hardware again with galvatron-fx profile-hardware",
            )
        near_group, near = min(measured, key=lambda item: (abs(math.log2(item[0]) - math.log2(group)), -item[0]))
        scale = ring_volume_factor(op, group) / ring_volume_factor(op, near_group)
        return CommFit(near.latency_s, near.bandwidth_Bps / scale)

    @property
    def comm_streams(self) -> bool:
        """Whether collectives can run on streams of their own beside compute (GPUs; not CPUs)."""
        return self.device != "cpu"

    def collective_s(self, op: str, nbytes: float, group: int, consecutive: bool = True) -> float:
        """Seconds for ``op`` over ``group`` ranks on a tensor of ``nbytes`` (0 for a group of one)."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        return self.fit(op, group, consecutive).time_s(nbytes)

    def blocking_s(self, group: int, compute_s: float = BLOCKING_PROBE_COMPUTE_S) -> float:
        """The arrival skew of a collective over ``group`` ranks after ``compute_s`` of compute since their
        last one (0 for a group of one)."""
        if group <= 1:
            return 0.0
        growth = self.blocking_growth_by_group.get(group, 0.0) * max(0.0, compute_s - BLOCKING_PROBE_COMPUTE_S)
        return self.blocking_by_group_s.get(group, self.blocking_collective_s) + growth

    def sharded_unit_s(self, dp_type: str, nbytes: float, group: int) -> float | None:
        """Measured seconds per step of a ``dp_type`` FSDP2 unit of ``nbytes`` parameters over ``group``
        ranks (see ``sharded_units``), or None where the profile has no such measurement."""
        fit = self.sharded_units.get(f"{dp_type}/{group}")
        return None if fit is None or group <= 1 else fit.time_s(nbytes)

    def p2p_s(self, nbytes: float, pp: int) -> float:
        """Seconds for one send/recv of ``nbytes`` between neighbouring stages of a ``pp``-stage pipeline."""
        if nbytes <= 0 or pp <= 1:
            return 0.0
        if not self.p2p:
            raise ProfileError(
                f"hardware profile {self.source or '(in memory)'} has no key p2p",
                "profile the hardware again with galvatron-fx profile-hardware",
            )
        fit = self.p2p.get(pp) or self.p2p[min(self.p2p, key=lambda k: abs(math.log2(k) - math.log2(pp)))]
        return fit.time_s(nbytes)

    def sustained_flops(self, dtype: str) -> float:
        """Sustained FLOP/s for ``dtype``; raises ProfileError if the profile has none."""
        value = self.flops_per_s.get(dtype)
        if not value:
            raise ProfileError(
                f"hardware profile {self.source or '(in memory)'} has no key flops_per_s/{dtype}",
                "use a Cluster preset or add the sustained throughput of the device",
            )
        return value

    def check(self, *, world_size: int | None = None, device: str | None = None) -> None:
        """Raise ProfileError (naming the file and key) if this profile describes another cluster."""
        where = self.source or "hardware profile"
        if world_size is not None and world_size != self.world_size:
            raise ProfileError(
                f"{where}: key world_size is {self.world_size}, but the plan is for {world_size} devices",
                f"profile the hardware with {world_size} processes, or use a preset for that cluster",
            )
        if device is not None and device.lower() != self.device.lower():
            raise ProfileError(
                f"{where}: key device is {self.device!r}, but the cluster has {device!r}",
                "profile this cluster's hardware, or pick the matching preset",
            )

    # -- JSON ----------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "world_size": self.world_size,
            "devices_per_node": self.devices_per_node,
            "device": self.device,
            "memory_bytes": self.memory_bytes,
            "backend": self.backend,
            "overlap_slowdown": self.overlap_slowdown,
            "flops_per_s": dict(self.flops_per_s),
            "optimizer_s_per_param": self.optimizer_s_per_param,
            "op_overhead_s": self.op_overhead_s,
            "autocast_cast_s_per_param": self.autocast_cast_s_per_param,
            "compute_slowdown": self.compute_slowdown,
            "blocking_collective_s": self.blocking_collective_s,
            "blocking_by_group_s": {str(k): v for k, v in sorted(self.blocking_by_group_s.items())},
            "blocking_growth_by_group": {str(k): v for k, v in sorted(self.blocking_growth_by_group.items())},
            "collectives": {k: [v.latency_s, v.bandwidth_Bps] for k, v in sorted(self.collectives.items())},
            "p2p": {str(k): [v.latency_s, v.bandwidth_Bps] for k, v in sorted(self.p2p.items())},
            "sharded_units": {k: [v.latency_s, v.bandwidth_Bps] for k, v in sorted(self.sharded_units.items())},
            "attention": {k: [v.per_call_s, v.flops_per_s] for k, v in sorted(self.attention.items())},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, world_size: int | None = None, device: str | None = None) -> "HardwareProfile":
        """Read a profile written by ``save`` or profile-hardware; check it against the cluster if asked."""
        profile = cls.from_json_dict(read_json(path), source=str(path))
        profile.check(world_size=world_size, device=device)
        return profile

    @classmethod
    def from_json_dict(cls, data: Any, source: str = "hardware profile") -> "HardwareProfile":
        if not isinstance(data, dict):
            raise ProfileError(f"{source} is not a JSON object", "write it with galvatron-fx profile-hardware")
        if data.get("format") != FORMAT:
            raise ProfileError(
                f"{source}: key format is {data.get('format')!r}, not {FORMAT!r}",
                "write it with galvatron-fx profile-hardware (Galvatron's files load with cost.galvatron_import)",
            )
        key = "world_size"
        try:
            world_size, devices_per_node = int(data["world_size"]), int(data["devices_per_node"])
            key = "collectives"
            collectives = {str(k): _comm_fit(v) for k, v in data["collectives"].items()}
            for name in collectives:
                op, group, layout = name.split("/")
                if op not in COLLECTIVES or int(group) < 2 or not _is_layout(layout):
                    raise ValueError(f"bad entry {name!r}")
            key = "p2p"
            p2p = {int(k): _comm_fit(v) for k, v in data.get("p2p", {}).items()}
            key = "overlap_slowdown"
            overlap = _scalar(data, key, floor=1.0)
            key = "flops_per_s"
            flops = {str(k): float(v) for k, v in (data.get("flops_per_s") or {}).items()}
            key = "optimizer_s_per_param"
            optimizer_s = _scalar(data, key, floor=0.0)
            key = "op_overhead_s"
            op_overhead_s = _scalar(data, key, floor=0.0)
            key = "autocast_cast_s_per_param"
            cast_s = _scalar(data, key, floor=0.0)
            key = "compute_slowdown"
            compute_slowdown = _scalar(data, key, floor=1.0)
            key = "blocking_collective_s"
            blocking_s = _scalar(data, key, floor=0.0)
            key = "blocking_by_group_s"
            blocking_by_group = {int(k): float(v) for k, v in (data.get("blocking_by_group_s") or {}).items()}
            if any(not (k >= 2 and v >= 0.0) for k, v in blocking_by_group.items()):
                raise ValueError(f"{blocking_by_group} has a group below 2 or a negative time")
            key = "blocking_growth_by_group"
            blocking_growth = {int(k): float(v) for k, v in (data.get("blocking_growth_by_group") or {}).items()}
            if any(not (k >= 2 and v >= 0.0) for k, v in blocking_growth.items()):
                raise ValueError(f"{blocking_growth} has a group below 2 or a negative growth")
            key = "sharded_units"
            sharded_units = {str(k): _comm_fit(v) for k, v in (data.get("sharded_units") or {}).items()}
            for name in sharded_units:
                kind, group = name.split("/")
                if kind not in ("zero2", "zero3") or int(group) < 2:
                    raise ValueError(f"bad entry {name!r}")
            key = "attention"
            attention = {str(k): _attention_fit(v) for k, v in (data.get("attention") or {}).items()}
            for name in attention:
                pass_, dtype = name.split("/")
                if pass_ not in ("fwd", "bwd") or not dtype:
                    raise ValueError(f"bad entry {name!r}")
            key = "memory_bytes"
            memory = data.get("memory_bytes")
            memory = int(memory) if memory is not None else None
            key = "device"
            device = str(data["device"])
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ProfileError(
                f"{source}: key {key} is missing or malformed ({type(error).__name__}: {error})",
                "profile the hardware again with galvatron-fx profile-hardware",
            ) from None
        if world_size < 1 or devices_per_node < 1:
            raise ProfileError(
                f"{source}: key world_size/devices_per_node must be positive", "profile the hardware again"
            )
        return cls(
            world_size,
            devices_per_node,
            device,
            memory,
            collectives,
            p2p,
            overlap,
            flops,
            str(data.get("backend", "")),
            source,
            optimizer_s,
            compute_slowdown,
            blocking_s,
            blocking_by_group,
            sharded_units,
            blocking_growth,
            op_overhead_s,
            cast_s,
            attention,
        )


def mean_profile(passes: Sequence[HardwareProfile]) -> HardwareProfile:
    """One profile from several passes over the same cluster, taken minutes apart where the machine's speed
    drifts: every scalar and per-group figure is the passes' mean, and every fit gives at each size the mean
    of the passes' times (mean latency, mean seconds per byte)."""

    def cluster(p: HardwareProfile) -> tuple:  # what every pass must share: the processes, devices and measured keys
        keyed = (
            "collectives",
            "p2p",
            "sharded_units",
            "flops_per_s",
            "blocking_by_group_s",
            "blocking_growth_by_group",
            "attention",
        )
        return (p.world_size, p.devices_per_node, p.device, p.backend, *(sorted(getattr(p, name)) for name in keyed))

    first = passes[0]
    for other in passes[1:]:
        if cluster(other) != cluster(first):
            raise ProfileError(
                f"{other.source or 'a hardware profile'} is not a pass over the cluster of "
                f"{first.source or 'the first'}",
                "average passes of profile-hardware taken on the same processes and devices",
            )

    def mean(name: str) -> float:
        return statistics.fmean(getattr(p, name) for p in passes)

    def means(name: str) -> dict:
        return {key: statistics.fmean(getattr(p, name)[key] for p in passes) for key in getattr(first, name)}

    def fits(name: str) -> dict:
        return {
            key: CommFit(
                statistics.fmean(getattr(p, name)[key].latency_s for p in passes),
                1 / statistics.fmean(1 / getattr(p, name)[key].bandwidth_Bps for p in passes),
            )
            for key in getattr(first, name)
        }

    return replace(
        first,
        collectives=fits("collectives"),
        p2p=fits("p2p"),
        sharded_units=fits("sharded_units"),
        overlap_slowdown=mean("overlap_slowdown"),
        flops_per_s=means("flops_per_s"),
        optimizer_s_per_param=mean("optimizer_s_per_param"),
        op_overhead_s=mean("op_overhead_s"),
        autocast_cast_s_per_param=mean("autocast_cast_s_per_param"),
        attention={
            key: AttentionFit(
                statistics.fmean(p.attention[key].per_call_s for p in passes),
                1 / statistics.fmean(1 / p.attention[key].flops_per_s for p in passes),
            )
            for key in first.attention
        },
        compute_slowdown=mean("compute_slowdown"),
        blocking_collective_s=mean("blocking_collective_s"),
        blocking_by_group_s=means("blocking_by_group_s"),
        blocking_growth_by_group=means("blocking_growth_by_group"),
        source=f"mean of {len(passes)} passes of {first.source or 'profile-hardware'}",
    )


def _scalar(data: dict, key: str, floor: float) -> float:
    """``data[key]`` as a float of at least ``floor`` (``floor`` where the key is absent: not measured)."""
    value = float(data.get(key, floor))
    if not value >= floor:
        raise ValueError(f"{value} < {floor:g}")
    return value


def _comm_fit(value: Any) -> CommFit:
    latency, bandwidth = (float(v) for v in value)
    if latency < 0 or not bandwidth > 0 or math.isinf(bandwidth):
        raise ValueError(f"latency {latency} / bandwidth {bandwidth} out of range")
    return CommFit(latency, bandwidth)


def _attention_fit(value: Any) -> AttentionFit:
    per_call, rate = (float(v) for v in value)
    if per_call < 0 or not rate > 0 or math.isinf(rate):
        raise ValueError(f"per call {per_call} s / {rate} FLOP/s out of range")
    return AttentionFit(per_call, rate)


def read_json(path: str | Path) -> Any:
    """JSON from ``path``; a missing or corrupt file raises ProfileError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(
            f"profile file {path} does not exist", "check the path, or run the profiler to write it"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProfileError(
            f"profile file {path} is not valid JSON ({error})", "run the profiler again to rewrite it"
        ) from None
    except OSError as error:
        raise ProfileError(
            f"profile file {path} cannot be read ({error})", "check the path and its permissions"
        ) from None
