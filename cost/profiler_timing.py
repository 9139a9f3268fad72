"""How the hardware profiler times what it measures: its sizes and repetitions (``ProfilerConfig``), and the
median of repeated runs, every rank at once behind a barrier or one rank alone."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(run: Callable[[], None], device: torch.device, config: ProfilerConfig, group=None) -> float:
    for _ in range(config.warmup):
        run()
    sync(device)
    times = []
    for _ in range(config.repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def local_median_time(run: Callable[[], None], device: torch.device, config: ProfilerConfig) -> float:
    """Like ``median_time`` without the barriers: for timing one rank while the others wait."""
    for _ in range(config.warmup):
        run()
    times = []
    for _ in range(config.repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
