"""The hardware profiler: time the collectives the plans use, fit latency + bytes / bandwidth.

Runs on every rank of an initialised process group (torchrun, or ``launch_local`` which starts CPU/GPU
processes in-process). For every power-of-two group size ``g`` ≤ world size and every layout
(consecutive ranks, ranks strided by ``world / g``, and the columns and depth groups of grid-parallel layers
where those are other shapes), all groups of that shape run each collective at
once (as in training, where every TP or DP group communicates together) over a few message sizes, with a
warm-up and the median of the repetitions; the slowest rank's median counts. Then send/recv between the
neighbouring stages of every pipeline degree, how much of an all-reduce stays visible next to compute,
what a Transformer block's training step costs per FLOP, per operator and per bf16 weight cast
(cost/step_probe.py), the slowdown of that block when every rank computes at once (processes sharing CPU
cores), the time of the gradient norm and an Adam step per parameter, what an all-reduce between compute
costs beyond its time in the sweep (the ranks' arrival skew; cost/compute_probes.py), and on CPUs what an
FSDP2 unit costs a step (cost/fsdp_probe.py). Time and memory are bounded by the message sizes and repetitions
(``ProfilerConfig``, cost/profiler_timing.py); the defaults on CPU keep 4 gloo processes on 2 cores well
under a minute.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from . import compute_probes
from .fsdp_probe import sharded_unit_times
from .hardware import BLOCKING_PROBE_COMPUTE_S, COLLECTIVES, CommFit, HardwareProfile, fit_latency_bandwidth
from .profiler_timing import ProfilerConfig, local_median_time, median_time, sync
from .step_probe import StepCosts, measure_step_costs


class _Progress:
    """A one-line progress bar on rank 0's stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {elapsed:5.1f}s {label:<40}"
            )
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _collective(op: str, nbytes: int, group, group_size: int, device: torch.device) -> Callable[[], None]:
    numel = max(nbytes // 4 // group_size, 1) * group_size  # divisible by the group for the sharded ops
    full = torch.ones(numel, device=device)
    shard = torch.ones(numel // group_size, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    # torch 2.13 names these *_single; older releases only have *_into_tensor / *_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op == "all_gather":
        return lambda: gather(full, shard, group=group)
    if op == "reduce_scatter":
        return lambda: scatter(shard, full, group=group)
    out = torch.empty_like(full)
    return lambda: dist.all_to_all_single(out, full, group=group)


def _group_shapes(world: int) -> list[tuple[int, str, list[list[int]]]]:
    """(group size, layout, the groups) of every shape measured: consecutive and strided (``world / g`` apart)
    groups of each power-of-two size, and the shapes of grid-parallel layers not among them (``stride<s>``): a
    column of ``g`` ranks ``g`` apart and a depth group of ``g`` ranks ``q²`` apart (cost/grid_tp.py)."""
    shapes = []
    group = 2
    while group <= world:
        count = world // group
        shapes.append((group, "consecutive", [[k * group + i for i in range(group)] for k in range(count)]))
        if group < world:
            shapes.append((group, "strided", [[k + i * count for i in range(group)] for k in range(count)]))
        strides = sorted({group} | {q * q for q in (2, 4, 8, 16, 32)})
        for stride in (s for s in strides if 1 < s < world // group and world % (s * group) == 0):
            span = stride * group  # each block of ``span`` ranks holds ``stride`` groups
            shapes.append(
                (
                    group,
                    f"stride{stride}",
                    [[b + o + i * stride for i in range(group)] for b in range(0, world, span) for o in range(stride)],
                )
            )
        group *= 2
    return shapes


def profile_hardware(
    config: ProfilerConfig | None = None, device: torch.device | None = None
) -> HardwareProfile | None:
    """Measure on every rank of the default process group; returns the profile on rank 0, None elsewhere."""
    from galvatron_fx.cluster import Cluster

    rank, world = dist.get_rank(), dist.get_world_size()
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
    config = config or ProfilerConfig.for_device(device)
    shapes = _group_shapes(world)
    pipelines = [pp for pp in (2**k for k in range(1, world.bit_length())) if world % pp == 0]
    progress = _Progress(len(shapes) * len(COLLECTIVES) + len(pipelines) + 6, config.progress and rank == 0)

    keys, medians, consecutive_groups = [], [], {}
    for group_size, layout, enumeration in shapes:
        group, _ = dist.new_subgroups_by_enumeration(enumeration)
        if layout == "consecutive":
            consecutive_groups[group_size] = group
        for op in COLLECTIVES:
            for nbytes in config.sizes_bytes:
                keys.append((f"{op}/{group_size}/{layout}", nbytes))
                medians.append(median_time(_collective(op, nbytes, group, group_size, device), device, config, group))
            progress.step(f"{op} g={group_size} {layout}")
    for pp in pipelines:
        for nbytes in config.sizes_bytes:
            keys.append((f"p2p/{pp}", nbytes))
            medians.append(_ping_pong(nbytes, world // pp, rank, device, config) if rank < 2 * (world // pp) else 0.0)
            dist.barrier()
        progress.step(f"send/recv pp={pp}")
    # rank 0 alone (the others wait): scaled below by the slowdown of every rank computing at once
    step = (
        measure_step_costs(
            device, config.matmul_dim, lambda run: local_median_time(run, device, config), seq=config.probe_seq
        )
        if rank == 0
        else StepCosts.unmeasured()  # no figure: rank 0's reach the MAX below
    )
    dist.barrier()
    progress.step("Transformer step: FLOPs, operators, casts")
    slowdown = compute_probes.overlap_slowdown(device, config)
    progress.step("compute/communication overlap")
    compute_slowdown = compute_probes.compute_slowdown(device, config)
    progress.step("compute of all ranks at once")
    optimizer_s = compute_probes.optimizer_s_per_param(device, config)
    progress.step("gradient norm and optimizer step")
    between_s = {
        size: compute_probes.collective_between_compute_s(device, config, group, BLOCKING_PROBE_COMPUTE_S)
        for size, group in consecutive_groups.items()
    }
    # again after longer compute: how the skew grows with the work since the ranks last met
    long_compute_s = 4 * BLOCKING_PROBE_COMPUTE_S
    between_long_s = {
        size: compute_probes.collective_between_compute_s(device, config, group, long_compute_s)
        for size, group in consecutive_groups.items()
    }
    progress.step("collectives between compute")
    # FSDP2 waits for its collectives in place where there are no communication streams: time it there
    units = (
        sharded_unit_times(config.sizes_bytes[-3:], lambda run: median_time(run, device, config), device)
        if device.type != "cuda"
        else {}
    )
    progress.step("FSDP2 units")

    # the slowest rank's median counts: one all-reduce (MAX) of every measurement
    table = torch.tensor(
        medians
        + list(units.values())
        + list(between_s.values())
        + list(between_long_s.values())
        + [optimizer_s, compute_slowdown, slowdown]
        + step.to_values(),
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    if rank != 0:
        return None
    values = table.tolist()
    samples: dict[str, list[tuple[int, float]]] = {}
    for (key, nbytes), seconds in zip(keys, values):
        samples.setdefault(key, []).append((nbytes, seconds))
    fits = {key: fit_latency_bandwidth([b for b, _ in pts], [t for _, t in pts]) for key, pts in samples.items()}
    unit_samples: dict[str, list[tuple[int, float]]] = {}
    for (kind, group, nbytes), seconds in zip(units, values[len(medians) :]):
        unit_samples.setdefault(f"{kind}/{group}", []).append((nbytes, seconds))
    unit_fits = {
        key: fit_latency_bandwidth([b for b, _ in pts], [t for _, t in pts]) for key, pts in unit_samples.items()
    }
    at, groups = len(medians) + len(units), list(between_s)
    blocking_s = skew_beyond_sweep(dict(zip(groups, values[at : at + len(groups)])), fits)
    blocking_long_s = skew_beyond_sweep(dict(zip(groups, values[at + len(groups) : at + 2 * len(groups)])), fits)
    growth = {
        g: max(0.0, (blocking_long_s[g] - blocking_s[g]) / (long_compute_s - BLOCKING_PROBE_COMPUTE_S))
        for g in blocking_s
    }
    cluster = Cluster.detect()
    at += 2 * len(groups)
    optimizer_s, compute_slowdown, slowdown = values[at], max(1.0, values[at + 1]), max(1.0, values[at + 2])
    step = StepCosts.from_values(values[at + 3 :]).slowed(compute_slowdown)
    return HardwareProfile(
        world_size=world,
        devices_per_node=min(cluster.devices_per_node, world),
        device=cluster.device,
        memory_bytes=cluster.memory_bytes,
        collectives={k: v for k, v in fits.items() if not k.startswith("p2p/")},
        p2p={int(k.split("/")[1]): v for k, v in fits.items() if k.startswith("p2p/")},
        overlap_slowdown=slowdown,
        flops_per_s=step.flops_per_s,
        backend=dist.get_backend(),
        source="profile-hardware",
        optimizer_s_per_param=optimizer_s,
        compute_slowdown=compute_slowdown,
        blocking_collective_s=blocking_s.get(world, 0.0),
        blocking_by_group_s=blocking_s,
        blocking_growth_by_group=growth,
        sharded_units=unit_fits,
        op_overhead_s=step.op_overhead_s,
        autocast_cast_s_per_param=step.autocast_cast_s_per_param,
        attention=step.attention,
    )


def skew_beyond_sweep(between_s: dict[int, float], fits: dict[str, CommFit]) -> dict[int, float]:
    """The ranks' arrival skew per group size: what the small all-reduce between compute cost
    (``compute_probes.collective_between_compute_s``) beyond its time in the sweep, where every rank starts
    it together after a barrier (the group's consecutive all-reduce fit), so that the fit plus the skew prices
    a collective between compute. Latency and skew trade places between launches; their sum does not."""
    return {
        g: max(0.0, t - fits[f"all_reduce/{g}/consecutive"].time_s(compute_probes.TOKEN_BYTES))
        for g, t in between_s.items()
    }


def _ping_pong(nbytes: int, step: int, rank: int, device: torch.device, config: ProfilerConfig) -> float:
    """One-way send/recv time between rank ``r`` of stage 0 and ``r + step`` of stage 1 (half a round trip)."""
    buffer = torch.ones(max(nbytes // 4, 1), device=device)
    peer = rank + step if rank < step else rank - step

    def round_trip():
        if rank < step:
            dist.send(buffer, peer)
            dist.recv(buffer, peer)
        else:
            dist.recv(buffer, peer)
            dist.send(buffer, peer)

    for _ in range(config.warmup):
        round_trip()
    times = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        round_trip()
        sync(device)
        times.append((time.perf_counter() - start) / 2)
    return statistics.median(times)


# -- launching without torchrun ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch_local(fn: Callable, nprocs: int, backend: str = "gloo", args: tuple = ()) -> None:
    """Run ``fn(*args)`` on ``nprocs`` freshly spawned processes forming a process group (like torchrun).

    ``fn`` must be importable (a module-level function) because the processes are spawned.
    """
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nprocs, _free_port(), backend, fn, args), nprocs=nprocs, join=True)
