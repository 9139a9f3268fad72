"""The hardware profiler: time the collectives the plans use, fit latency + bytes / bandwidth.

Runs on every rank of an initialised process group (torchrun, or ``launch_local`` which starts CPU/GPU
processes in-process). For every power-of-two group size ``g`` ≤ world size and every layout
(consecutive ranks, ranks strided by ``world / g``, and the columns and depth groups of grid-parallel layers
where those are other shapes), all groups of that shape run each collective at
once (as in training, where every TP or DP group communicates together) over a few message sizes, with a
warm-up and the median of the repetitions; the slowest rank's median counts. Then send/recv between the
neighbouring stages of every pipeline degree, how much of an all-reduce stays visible next to compute,
what a Transformer block's training step costs per FLOP, per operator and per bf16 weight cast
(cost/step_probe.py), the slowdown of a Transformer block when every rank computes at once
(processes sharing CPU cores), the time of an Adam step per parameter, and on CPUs what an FSDP2 unit
costs a step (cost/fsdp_probe.py). Time and memory are bounded by the message sizes and repetitions
(``ProfilerConfig``); the defaults on CPU keep 4 gloo processes on 2 cores well under a minute.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .fsdp_probe import sharded_unit_times
from .hardware import BLOCKING_PROBE_COMPUTE_S, COLLECTIVES, HardwareProfile, fit_latency_bandwidth
from .step_probe import PROBE_DTYPES, StepCosts, measure_step_costs

KiB, MiB = 2**10, 2**20


@dataclass(frozen=True)
class ProfilerConfig:
    """Message sizes (bytes), repetitions and the overlap test's matrix size."""

    sizes_bytes: tuple[int, ...] = (64 * KiB, 512 * KiB, 2 * MiB)
    repeats: int = 3
    warmup: int = 1
    matmul_dim: int = 256
    probe_seq: int = 32  # the step probe's sequence (cost/step_probe.py): its batches are 1, 2 and 8 of these
    progress: bool = True
    optimizer_params: int = 4 * 2**20  # beyond the caches, as a model's parameters are

    @classmethod
    def for_device(cls, device: torch.device, progress: bool = True) -> "ProfilerConfig":
        if device.type == "cuda":
            return cls(
                (1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB),
                repeats=5,
                warmup=2,
                matmul_dim=4096,
                probe_seq=512,  # a GPU's throughput needs thousands of tokens per matmul
                progress=progress,
                optimizer_params=64 * 2**20,
            )
        # CPU timings are noisy (other processes, shared cores): more sizes and repetitions, medians of them
        # up to 8 MiB: DDP's buckets reach tens of MiB, so the bandwidth must come from large messages
        return cls((16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 8 * MiB), repeats=10, warmup=2, progress=progress)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _median_time(run: Callable[[], None], device: torch.device, config: ProfilerConfig, group=None) -> float:
    for _ in range(config.warmup):
        run()
    _sync(device)
    times = []
    for _ in range(config.repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _local_median_time(run: Callable[[], None], device: torch.device, config: ProfilerConfig) -> float:
    """Like ``_median_time`` without the barriers: for timing one rank while the others wait."""
    for _ in range(config.warmup):
        run()
    times = []
    for _ in range(config.repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
                medians.append(_median_time(_collective(op, nbytes, group, group_size, device), device, config, group))
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
            device, config.matmul_dim, lambda run: _local_median_time(run, device, config), seq=config.probe_seq
        )
        if rank == 0
        else StepCosts({d: math.inf for d in PROBE_DTYPES}, 0.0, 0.0)  # no figure: rank 0's reach the MAX below
    )
    dist.barrier()
    progress.step("Transformer step: FLOPs, operators, casts")
    slowdown = _overlap_slowdown(device, config)
    progress.step("compute/communication overlap")
    compute_slowdown = _compute_slowdown(device, config)
    progress.step("compute of all ranks at once")
    optimizer_s = _optimizer_s_per_param(device, config)
    progress.step("optimizer step")
    skew_s = {
        size: _arrival_skew_s(device, config, group, BLOCKING_PROBE_COMPUTE_S)
        for size, group in consecutive_groups.items()
    }
    # again after longer compute: how the skew grows with the work since the ranks last met
    long_compute_s = 4 * BLOCKING_PROBE_COMPUTE_S
    skew_long_s = {
        size: _arrival_skew_s(device, config, group, long_compute_s) for size, group in consecutive_groups.items()
    }
    progress.step("collectives between compute")
    # FSDP2 waits for its collectives in place where there are no communication streams: time it there
    units = (
        sharded_unit_times(config.sizes_bytes[-3:], lambda run: _median_time(run, device, config), device)
        if device.type != "cuda"
        else {}
    )
    progress.step("FSDP2 units")

    # the slowest rank's median counts: one all-reduce (MAX) of every measurement
    table = torch.tensor(
        medians
        + list(units.values())
        + list(skew_s.values())
        + list(skew_long_s.values())
        + [1 / step.flops_per_s[d] for d in PROBE_DTYPES]
        + [step.op_overhead_s, step.autocast_cast_s_per_param]
        + [optimizer_s, compute_slowdown, slowdown],
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
    skew_at = len(medians) + len(units)
    blocking_s = dict(zip(skew_s, values[skew_at : skew_at + len(skew_s)]))
    blocking_long_s = dict(zip(skew_s, values[skew_at + len(skew_s) : skew_at + 2 * len(skew_s)]))
    growth = {
        g: max(0.0, (blocking_long_s[g] - blocking_s[g]) / (long_compute_s - BLOCKING_PROBE_COMPUTE_S))
        for g in blocking_s
    }
    cluster = Cluster.detect()
    compute_slowdown = max(1.0, values[-2])
    s_per_flop = values[-7 : -7 + len(PROBE_DTYPES)]
    step = StepCosts({d: 1 / s for d, s in zip(PROBE_DTYPES, s_per_flop)}, values[-5], values[-4]).slowed(
        compute_slowdown
    )
    return HardwareProfile(
        world_size=world,
        devices_per_node=min(cluster.devices_per_node, world),
        device=cluster.device,
        memory_bytes=cluster.memory_bytes,
        collectives={k: v for k, v in fits.items() if not k.startswith("p2p/")},
        p2p={int(k.split("/")[1]): v for k, v in fits.items() if k.startswith("p2p/")},
        overlap_slowdown=max(1.0, values[-1]),
        flops_per_s=step.flops_per_s,
        backend=dist.get_backend(),
        source="profile-hardware",
        optimizer_s_per_param=values[-3],
        compute_slowdown=compute_slowdown,
        blocking_collective_s=blocking_s.get(world, 0.0),
        blocking_by_group_s=blocking_s,
        blocking_growth_by_group=growth,
        sharded_units=unit_fits,
        op_overhead_s=step.op_overhead_s,
        autocast_cast_s_per_param=step.autocast_cast_s_per_param,
    )


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
        _sync(device)
        times.append((time.perf_counter() - start) / 2)
    return statistics.median(times)


def _transformer_block(dim: int, device: torch.device) -> Callable[[], None]:
    """Forward and backward of a small pre-norm Transformer block (attention and MLP) on ``dim`` tokens of
    width ``dim``: the mix of matmuls and memory-bound kernels (layer norm, softmax, GELU) that a model's
    layers run, which slow down differently when processes share cores (a matmul alone hides that)."""
    heads, tokens = 4, dim
    scale = 1.0 / math.sqrt(dim // heads)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    w_qkv, w_out = (torch.randn(dim, n * dim, device=device, requires_grad=True) for n in (3, 1))
    w_up, w_down = (
        torch.randn(dim, 4 * dim, device=device, requires_grad=True),
        torch.randn(4 * dim, dim, device=device, requires_grad=True),
    )

    def step():
        q, k, v = (F.layer_norm(x, (dim,)) @ w_qkv).view(tokens, 3, heads, dim // heads).unbind(1)
        scores = torch.softmax(q.transpose(0, 1) @ k.permute(1, 2, 0) * scale, dim=-1)
        y = x + (scores @ v.transpose(0, 1)).transpose(0, 1).reshape(tokens, dim) @ w_out
        (y + F.gelu(F.layer_norm(y, (dim,)) @ w_up) @ w_down).sum().backward()

    return step


def _compute_slowdown(device: torch.device, config: ProfilerConfig, work_s: float = 25e-3) -> float:
    """≥ 1: the wall time until every rank has run ``work_s`` of a Transformer block's forward and backward,
    all at once, over rank 0's time running it alone (about 1 on GPUs, the oversubscription factor when
    ranks share fewer CPU cores). A training step waits for its slowest rank, so the slowest one counts;
    the work is long enough (as between a step's synchronisations) that the scheduler's time slices even
    out; alone and together alternate, so that drifts of the machine cancel. Rank 0's ratio; the others
    return 1."""
    step = _transformer_block(config.matmul_dim, device)
    steps = torch.tensor([max(1, round(work_s / max(_local_median_time(step, device, config), 1e-9)))], device=device)
    dist.broadcast(steps, src=0)  # every rank runs the same work

    def run() -> float:
        start = time.perf_counter()
        for _ in range(int(steps)):
            step()
        _sync(device)
        return time.perf_counter() - start

    alone, together = [], []
    for _ in range(config.repeats):
        dist.barrier()
        if dist.get_rank() == 0:  # the others wait
            alone.append(run())
        dist.barrier()
        slowest = torch.tensor([run()], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        together.append(slowest.item())
    return max(1.0, statistics.median(together) / statistics.median(alone)) if dist.get_rank() == 0 else 1.0


def _arrival_skew_s(device: torch.device, config: ProfilerConfig, group, compute_s: float, rounds: int = 8) -> float:
    """What a small all-reduce (1 KiB) over ``group`` costs beyond its back-to-back time when every rank
    computes ``compute_s`` before it, as between tensor-parallel collectives: rounds of compute + all-reduce,
    minus the same compute alone and the all-reduces alone, run back to back; the median of these
    differences. The ranks of a larger group wait for more of each other, and the longer they computed
    since they last met, the further apart they arrive."""
    n = config.matmul_dim
    a = torch.randn(n, n, device=device)
    token = torch.ones(256, device=device)
    single = _local_median_time(lambda: a @ a, device, config)
    repeats = torch.tensor([max(1, min(2000, int(compute_s / max(single, 1e-9))))], device=device)
    dist.broadcast(repeats, src=0)  # every rank computes the same between collectives, as TP ranks do

    def run(compute: bool, collective: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            for _ in range(int(repeats) if compute else 0):
                a @ a
            if collective:
                dist.all_reduce(token, group=group)
        _sync(device)
        return time.perf_counter() - start

    run(True, True)
    extra_s = []  # each from three runs back to back: a drift of the machine hits all three alike
    for _ in range(max(3, 2 * config.repeats)):
        extra_s.append(run(True, True) - run(True, False) - run(False, True))
    return max(0.0, statistics.median(extra_s)) / rounds


def _optimizer_s_per_param(device: torch.device, config: ProfilerConfig) -> float:
    """Seconds of one ``torch.optim.Adam`` step per parameter, on ``config.optimizer_params`` parameters
    in a few tensors, every rank at once (as in training)."""
    params = [torch.nn.Parameter(torch.zeros(config.optimizer_params // 8, device=device)) for _ in range(8)]
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer = torch.optim.Adam(params)
    optimizer.step()  # creates the states
    seconds = _median_time(optimizer.step, device, config)
    return seconds / (len(params) * (config.optimizer_params // 8))


def _overlap_slowdown(device: torch.device, config: ProfilerConfig) -> float:
    """1 + the share of an all-reduce (of the largest message) that stays visible next to compute of the
    same length: (time for both to finish − compute alone) / communication alone. 1 when the
    communication hides completely (its own stream and engine), 2 when compute and communication only
    take turns (gloo's threads and the compute sharing the same cores), more when they also slow each
    other down. Timing compute alone would miss the communication's own slowdown."""
    n = config.matmul_dim
    a = torch.randn(n, n, device=device)
    comm = torch.ones(config.sizes_bytes[-1] // 4, device=device)
    alone = _median_time(lambda: a @ a, device, config)
    comm_s = _median_time(lambda: dist.all_reduce(comm), device, config)
    repeats = max(1, min(200, int(comm_s / max(alone, 1e-9))))  # compute about as long as the communication

    def compute():
        for _ in range(repeats):
            a @ a

    def both():
        work = dist.all_reduce(comm, async_op=True)
        compute()
        work.wait()

    runs = {"comm": lambda: dist.all_reduce(comm), "compute": compute, "both": both}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    once = dataclasses.replace(config, repeats=1, warmup=0)
    for _ in range(3 * config.repeats):  # alternated, so that drifts of the machine cancel (the noisiest figure)
        for name, run in runs.items():
            samples[name].append(_median_time(run, device, once))
    comm_s, compute_s, both_s = (statistics.median(samples[name]) for name in runs)
    return max(1.0, 1.0 + (both_s - compute_s) / max(comm_s, 1e-9))


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
