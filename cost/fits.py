"""Lines fitted to measurements: a collective's ``latency + bytes / bandwidth`` (``CommFit``, through
``fit_latency_bandwidth``) and a fused attention kernel's ``calls · per call + FLOPs / rate`` (``AttentionFit``).
``HardwareProfile`` holds them (cost/hardware.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class CommFit:
    """``time_s(nbytes) = latency_s + nbytes / bandwidth_Bps``."""

    latency_s: float
    bandwidth_Bps: float

    def time_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps if nbytes > 0 else 0.0


@dataclass(frozen=True)
class AttentionFit:
    """One pass (forward or backward) of a fused attention kernel: ``calls · per_call_s + FLOPs / flops_per_s``.
    Its own line, not the matmuls' rate: on CPUs bf16 attention's backward runs at a fraction of fp32's rate
    where bf16 matmuls run faster, and on GPUs flash attention at short sequences runs well below the matmuls'
    rate."""

    per_call_s: float
    flops_per_s: float

    def time_s(self, calls: float, flops: float) -> float:
        return calls * self.per_call_s + flops / self.flops_per_s

    def slowed(self, factor: float) -> "AttentionFit":
        """The fit when compute runs ``factor`` times slower (every rank computing at once)."""
        return AttentionFit(self.per_call_s * factor, self.flops_per_s / factor)


def fit_latency_bandwidth(sizes_bytes: Sequence[float], times_s: Sequence[float]) -> CommFit:
    """Least-squares line through (bytes, seconds); latency clamped at 0, bandwidth kept positive."""
    n = len(sizes_bytes)
    if n == 0:
        raise ValueError("no measurements to fit")
    if n == 1 or max(sizes_bytes) == min(sizes_bytes):
        return CommFit(0.0, max(sizes_bytes) / max(max(times_s), 1e-12))
    mean_x, mean_y = sum(sizes_bytes) / n, sum(times_s) / n
    sxx = sum((x - mean_x) ** 2 for x in sizes_bytes)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes_bytes, times_s)) / sxx
    intercept = mean_y - slope * mean_x
    if slope <= 0:  # noise dominates: fall back to the largest message's average rate
        return CommFit(0.0, max(sizes_bytes) / max(max(times_s), 1e-12))
    if intercept < 0:  # a negative latency is noise too: refit through the origin
        slope = sum(x * y for x, y in zip(sizes_bytes, times_s)) / sum(x * x for x in sizes_bytes)
        intercept = 0.0
    return CommFit(intercept, 1.0 / slope)
