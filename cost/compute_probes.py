"""The hardware profiler's compute probes: how much slower a rank computes while every rank does, what a
collective costs between compute beyond its own time, an Adam step per parameter, and how much of a
communication stays visible next to compute."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from .profiler_timing import ProfilerConfig, local_median_time, median_time, sync
from .step_probe import probe_step


def compute_slowdown(device: torch.device, config: ProfilerConfig, work_s: float = 25e-3) -> float:
    """≥ 1: the wall time until every rank has run ``work_s`` of a Transformer block's forward and backward,
    all at once, over rank 0's time running it alone (about 1 on GPUs, the oversubscription factor when
    ranks share fewer CPU cores). A training step waits for its slowest rank, so the slowest one counts;
    the work is long enough (as between a step's synchronisations) that the scheduler's time slices even
    out; alone and together alternate, so that drifts of the machine cancel. Rank 0's ratio; the others
    return 1."""
    step = probe_step(config.matmul_dim, config.matmul_dim, device)
    steps = torch.tensor([max(1, round(work_s / max(local_median_time(step, device, config), 1e-9)))], device=device)
    dist.broadcast(steps, src=0)  # every rank runs the same work

    def run() -> float:
        start = time.perf_counter()
        for _ in range(int(steps)):
            step()
        sync(device)
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


TOKEN_BYTES = 1024  # the all-reduce of ``collective_between_compute_s``: its own time is its latency


def collective_between_compute_s(
    device: torch.device, config: ProfilerConfig, group, compute_s: float, rounds: int = 8
) -> float:
    """What a small all-reduce (``TOKEN_BYTES``) over ``group`` costs when every rank computes ``compute_s``
    before it, as between tensor-parallel collectives: rounds of compute + all-reduce, minus the same compute
    alone, run back to back; the median of these differences. Beyond the collective's own time it holds the
    ranks' arrival skew: the ranks of a larger group wait for more of each other, and the longer they computed
    since they last met, the further apart they arrive. (Back-to-back all-reduces without compute are no
    baseline for it: where processes share cores they cost more than one timed after a barrier, as the
    collective sweep times them.)"""
    n = config.matmul_dim
    a = torch.randn(n, n, device=device)
    token = torch.ones(TOKEN_BYTES // 4, device=device)
    single = local_median_time(lambda: a @ a, device, config)
    repeats = torch.tensor([max(1, min(2000, int(compute_s / max(single, 1e-9))))], device=device)
    dist.broadcast(repeats, src=0)  # every rank computes the same between collectives, as TP ranks do

    def run(collective: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            for _ in range(int(repeats)):
                a @ a
            if collective:
                dist.all_reduce(token, group=group)
        sync(device)
        return time.perf_counter() - start

    run(True)
    extra_s = []  # each from two runs back to back: a drift of the machine hits both alike
    for _ in range(max(3, 2 * config.repeats)):
        extra_s.append(run(True) - run(False))
    return max(0.0, statistics.median(extra_s)) / rounds


def optimizer_s_per_param(device: torch.device, config: ProfilerConfig) -> float:
    """Seconds per parameter of what the trainer does to each parameter after the gradient sync: the pass
    of the global gradient norm over its gradient (every step computes it, clipped or not) and one
    ``torch.optim.Adam`` step; on ``config.optimizer_params`` parameters in a few tensors, every rank at
    once (as in training)."""
    params = [torch.nn.Parameter(torch.zeros(config.optimizer_params // 8, device=device)) for _ in range(8)]
    for param in params:
        param.grad = torch.ones_like(param)
    grads = [param.grad for param in params]
    optimizer = torch.optim.Adam(params)
    optimizer.step()  # creates the states

    def update() -> None:
        torch.stack(torch._foreach_norm(grads, 2)).pow(2).sum()  # as runtime.grad_norm.GlobalGradNorm.norm
        optimizer.step()

    seconds = median_time(update, device, config)
    return seconds / (len(params) * (config.optimizer_params // 8))


def overlap_slowdown(device: torch.device, config: ProfilerConfig) -> float:
    """1 + the share of an all-reduce (of the largest message) that stays visible next to compute of the
    same length: (time for both to finish − compute alone) / communication alone. 1 when the
    communication hides completely (its own stream and engine), 2 when compute and communication only
    take turns (gloo's threads and the compute sharing the same cores), more when they also slow each
    other down. Timing compute alone would miss the communication's own slowdown."""
    n = config.matmul_dim
    a = torch.randn(n, n, device=device)
    comm = torch.ones(config.sizes_bytes[-1] // 4, device=device)
    alone = median_time(lambda: a @ a, device, config)
    comm_s = median_time(lambda: dist.all_reduce(comm), device, config)
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
            samples[name].append(median_time(run, device, once))
    comm_s, compute_s, both_s = (statistics.median(samples[name]) for name in runs)
    return max(1.0, 1.0 + (both_s - compute_s) / max(comm_s, 1e-9))
