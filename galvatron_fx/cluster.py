"""Cluster: the devices a plan is made for — nodes × devices per node, device kind, memory, links, throughput.

A Cluster can describe hardware that is not at hand (``Cluster.preset("H100-80GB", nodes=4)``, datasheet
figures: NVLink within a node, one InfiniBand NIC per GPU across nodes), the machine the launcher started
us on (``Cluster.detect()`` from torchrun's or SLURM's environment), or a JSON file. ``hardware_profile()``
turns it into the HardwareProfile the cost model reads, with a ring model of the collectives; the
hardware profiler replaces those estimates with measurements.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .units import parse_bytes

GiB = 2**30
TFLOPS = 1e12
GBps = 1e9


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of one device kind (dense TFLOP/s; link figures per direction, per GPU)."""

    memory_bytes: int
    peak_flops: Mapping[str, float]
    sustained_flops: Mapping[str, float]
    intra_node_Bps: float  # NVLink, per direction
    inter_node_Bps: float  # InfiniBand NIC per GPU
    intra_node_latency_s: float = 10e-6
    inter_node_latency_s: float = 20e-6


def _gpu(memory_gib: float, fp32: float, bf16: float, nvlink_GBps: float, ib_Gbit: float) -> DeviceSpec:
    # Sustained: large GEMM-heavy training typically reaches about half of the dense bf16 peak (MFU ~50%)
    # and ~70% of the non-tensor-core fp32 peak (PyTorch leaves TF32 off for matmuls by default).
    return DeviceSpec(
        memory_bytes=int(memory_gib * GiB),
        peak_flops={"fp32": fp32 * TFLOPS, "bf16": bf16 * TFLOPS, "fp16": bf16 * TFLOPS},
        sustained_flops={"fp32": 0.7 * fp32 * TFLOPS, "bf16": 0.5 * bf16 * TFLOPS, "fp16": 0.5 * bf16 * TFLOPS},
        intra_node_Bps=nvlink_GBps * GBps,
        inter_node_Bps=ib_Gbit / 8 * GBps,
    )


# NVLink: A100 600 GB/s, H100/H200 900 GB/s bidirectional (half per direction); InfiniBand HDR 200 Gb/s
# per A100, NDR 400 Gb/s per H100/H200. Dense peaks: A100 19.5 fp32 / 312 bf16, H100/H200 SXM 67 / 989.
PRESETS: dict[str, DeviceSpec] = {
    "A100-40GB": _gpu(40, 19.5, 312, 300, 200),
    "A100-80GB": _gpu(80, 19.5, 312, 300, 200),
    "H100-80GB": _gpu(80, 67, 989, 450, 400),
    "H200": _gpu(141, 67, 989, 450, 400),
}
# What detect() assumes for CPU processes (gloo over shared memory / TCP); measure for real figures.
CPU_SPEC = DeviceSpec(
    memory_bytes=0,
    # bf16 priced as fp32: without matrix extensions CPUs compute bf16 no faster
    peak_flops={"fp32": 1e11, "bf16": 1e11},
    sustained_flops={"fp32": 2e10, "bf16": 2e10},
    intra_node_Bps=2 * GBps,
    inter_node_Bps=1.25 * GBps,
    intra_node_latency_s=50e-6,
    inter_node_latency_s=100e-6,
)
LINK_EFFICIENCY = 0.8  # fraction of the datasheet link bandwidth that collectives reach (NCCL bus bandwidth)


@dataclass(frozen=True)
class Cluster:
    """``nodes`` × ``devices_per_node`` devices of kind ``device`` with ``memory_bytes`` each."""

    nodes: int
    devices_per_node: int
    device: str
    memory_bytes: int
    intra_node_Bps: float
    inter_node_Bps: float
    intra_node_latency_s: float = 10e-6
    inter_node_latency_s: float = 20e-6
    peak_flops: Mapping[str, float] = field(default_factory=dict, hash=False)
    sustained_flops: Mapping[str, float] = field(default_factory=dict, hash=False)
    overlap_slowdown: float = 1.1

    def __post_init__(self):
        for name in ("nodes", "devices_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"cluster {name}={value!r} is not a positive integer", f"give {name} >= 1")
        if self.memory_bytes <= 0:
            raise ConfigError(
                f"cluster memory_bytes={self.memory_bytes!r} is not positive",
                'give the memory per device, e.g. "80GiB"',
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    # -- construction --------------------------------------------------------------------------
    @property
    def default_budget_bytes(self) -> int:
        """The memory budget the search uses when none is given: the device's memory less what a training
        process needs besides its tensors, ``max(2 GiB, 10 %)``: the CUDA context (0.3-0.6 GiB on current GPUs:
        ``torch.cuda.mem_get_info`` before the first allocation shows it), NCCL's communicator buffers
        (``NCCL_BUFFSIZE``, 4 MiB per channel and peer by default, so tens to hundreds of MiB per communicator
        with several groups), and the caching allocator's fragmentation (``torch.cuda.memory_reserved`` minus
        ``memory_allocated``, typically a few percent to 10 % of a training step's peak)."""
        return self.memory_bytes - max(2 * GiB, self.memory_bytes // 10)

    @classmethod
    def preset(
        cls, name: str, nodes: int = 1, devices_per_node: int = 8, memory: "int | str | None" = None
    ) -> "Cluster":
        """A cluster of a known device kind (see ``PRESETS``); ``memory`` overrides the per-device memory."""
        spec = PRESETS.get(name) or next((v for k, v in PRESETS.items() if k.lower() == str(name).lower()), None)
        if spec is None:
            raise ConfigError(
                f"device preset {name!r} is unknown", f"use one of {sorted(PRESETS)}, or load a cluster JSON"
            )
        name = next(k for k, v in PRESETS.items() if v is spec)
        return cls._from_spec(
            name, spec, nodes, devices_per_node, parse_bytes(memory) if memory is not None else spec.memory_bytes
        )

    @classmethod
    def _from_spec(cls, name: str, spec: DeviceSpec, nodes: int, devices_per_node: int, memory_bytes: int) -> "Cluster":
        return cls(
            nodes,
            devices_per_node,
            name,
            memory_bytes,
            spec.intra_node_Bps,
            spec.inter_node_Bps,
            spec.intra_node_latency_s,
            spec.inter_node_latency_s,
            dict(spec.peak_flops),
            dict(spec.sustained_flops),
        )

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> "Cluster":
        """The cluster this process was launched on, from torchrun's or SLURM's environment.

        World size: ``WORLD_SIZE`` (torchrun), else ``SLURM_NTASKS``, else 1. Devices per node:
        ``LOCAL_WORLD_SIZE``, else ``SLURM_NTASKS_PER_NODE`` / ``SLURM_GPUS_ON_NODE``, else the visible GPUs.
        The device kind is matched against the presets by its CUDA name; on CPU it is "cpu" with the
        physical memory shared among the node's processes.
        """
        env = os.environ if env is None else env
        world = _env_int(env, "WORLD_SIZE") or _env_int(env, "SLURM_NTASKS")
        local = (
            _env_int(env, "LOCAL_WORLD_SIZE")
            or _env_int(env, "SLURM_NTASKS_PER_NODE")
            or _env_int(env, "SLURM_GPUS_ON_NODE")
        )
        nodes_env = _env_int(env, "SLURM_NNODES") or _env_int(env, "SLURM_JOB_NUM_NODES")
        name, spec, memory = _local_device()
        if local is None:
            local = (world // nodes_env if world and nodes_env else None) or _visible_gpus() or world or 1
        world = world or local * (nodes_env or 1)
        if world % local:
            raise ConfigError(
                f"world size {world} is not a multiple of the {local} processes per node",
                "launch the same number of processes on every node",
            )
        return cls._from_spec(name, spec, world // local, local, memory if name != "cpu" else max(memory // local, 1))

    # -- JSON ----------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak_flops"], data["sustained_flops"] = dict(self.peak_flops), dict(self.sustained_flops)
        return {"format": "galvatron_fx.cluster/1", **data}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Cluster":
        """Read a cluster JSON written by ``save``; ``memory_bytes`` may also be a string such as "80GiB"."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"cluster file {path} does not exist", "check the path, or use Cluster.preset") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"cluster file {path} is not valid JSON ({error})", "write it with Cluster.save"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"cluster file {path} is not a JSON object", "write it with Cluster.save")
        data = {k: v for k, v in data.items() if k != "format"}
        if "preset" in data:  # {"preset": "H100-80GB", "nodes": 2, ...}: a preset with overrides
            base = cls.preset(data.pop("preset"), int(data.pop("nodes", 1)), int(data.pop("devices_per_node", 8)))
            data = {**base.to_json_dict(), **data}
            data.pop("format")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"cluster file {path}: unknown keys {unknown}", f"use only {sorted(known)}")
        try:
            data["memory_bytes"] = parse_bytes(data["memory_bytes"])
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"cluster file {path}: key memory_bytes: {error.cause}", error.remedy) from None
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"cluster file {path}: missing or malformed key ({type(error).__name__}: {error})",
                "write it with Cluster.save",
            ) from None

    def with_memory(self, memory: "int | str") -> "Cluster":
        """The same cluster with another per-device memory budget ("36GB", "16GiB", bytes)."""
        return replace(self, memory_bytes=parse_bytes(memory))

    # -- the cost model's view -------------------------------------------------------------------
    def hardware_profile(self):
        """A HardwareProfile estimated from the datasheet figures with a ring model of each collective."""
        from galvatron_fx.cost.hardware import COLLECTIVES, CommFit, HardwareProfile, ring_volume_factor

        world = self.world_size
        collectives = {}
        group = 2
        while group <= world:
            for consecutive in (True, False):
                stride = 1 if consecutive else world // group
                ranks = [k * stride for k in range(group)]
                inter = len({r // self.devices_per_node for r in ranks}) > 1
                link_Bps = (self.inter_node_Bps if inter else self.intra_node_Bps) * LINK_EFFICIENCY
                latency_s = self.inter_node_latency_s if inter else self.intra_node_latency_s
                for op in COLLECTIVES:
                    hops = 2 * math.log2(group) if op == "all_reduce" else math.log2(group)
                    fit = CommFit(latency_s * hops, link_Bps / ring_volume_factor(op, group))
                    collectives[f"{op}/{group}/{'consecutive' if consecutive else 'strided'}"] = fit
            group *= 2
        p2p = {}
        pp = 2
        while pp <= world:
            step = world // pp  # stage s and s+1 hold ranks that differ by world / pp
            inter = step >= self.devices_per_node or self.devices_per_node % step != 0
            p2p[pp] = CommFit(
                self.inter_node_latency_s if inter else self.intra_node_latency_s,
                (self.inter_node_Bps if inter else self.intra_node_Bps) * LINK_EFFICIENCY,
            )
            pp *= 2
        return HardwareProfile(
            world,
            self.devices_per_node,
            self.device,
            self.memory_bytes,
            collectives,
            p2p,
            self.overlap_slowdown,
            dict(self.sustained_flops),
            backend="preset",
            source=f"cluster {self.device} {self.nodes}x{self.devices_per_node}",
        )


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    match = re.match(r"\s*(\d+)", str(value))  # SLURM writes e.g. "8(x2)"
    if not match:
        raise ConfigError(f"environment variable {name}={value!r} is not a number", f"unset {name} or give an integer")
    return int(match.group(1))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_device() -> tuple[str, DeviceSpec, int]:
    """(kind, figures, memory bytes) of the local device: a CUDA GPU matched to a preset, or the CPU."""
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        name, memory = properties.name, int(properties.total_memory)
        kind = (
            "H200"
            if "H200" in name
            else "H100-80GB"
            if "H100" in name
            else ("A100-80GB" if memory > 60 * GiB else "A100-40GB")
            if "A100" in name
            else None
        )
        if kind:
            return kind, PRESETS[kind], memory
        return name, replace(PRESETS["A100-40GB"], memory_bytes=memory), memory  # unknown GPU: modest figures
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 8 * GiB
    return "cpu", CPU_SPEC, int(memory)
