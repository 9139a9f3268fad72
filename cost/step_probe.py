"""What a training step costs beyond its FLOPs: the step probe of the hardware profiler.

An analytic profile prices a layer as its graph-counted FLOPs over a sustained throughput. That misses the
time a step takes whatever its batch: every operator's dispatch and launch (microseconds each, hundreds per
layer), and under bf16 autocast the cast of every weight a matrix multiplication reads, made again at each
forward. At the small micro-batches of a pipeline, or a tensor-parallel rank's share of one, that part is a
large share of the step, and FLOPs alone price bf16 as faster than fp32 where it is not.

The probe is a pre-norm Transformer block (attention and a GELU MLP, as GPT-2's and BERT's layers are),
trained forward and backward at several batch sizes in fp32 and under bf16 autocast, on one process while
the others wait: where processes share cores, timings taken among them are too noisy for a line's intercept
(from 0 to 67 µs per operator between two launches on 2 cores), so the profiler scales the figures by the
compute slowdown it measures apart. A line through (FLOPs, seconds) per dtype gives:

- ``flops_per_s[dtype]``: the marginal throughput of a Transformer step (its slope);
- ``op_overhead_s``: the fp32 intercept per operator the probe's forward and backward dispatch, counted as
  the analytic profile counts a layer's (``DispatchCounter``), so that a layer's fixed time is its operator
  count times this;
- ``autocast_cast_s_per_param``: what the bf16 intercept adds, per parameter autocast casts;
- ``attention``: fused attention's own line per pass and dtype (``measure_attention``): the block's slope
  blends its few attention FLOPs into the matmuls' rate, but a model's attention runs at a rate of its own
  (on this machine's CPU, bf16 attention's backward runs at a fifth of fp32's rate).

The probe's operators and parameters are not any model's: the figures transfer to the models the analytic
profile prices by their own counts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from galvatron_fx.passes.analysis.annotate import CPU_ATTENTION_FLOPS, DispatchCounter

from .fits import AttentionFit, fit_latency_bandwidth

PROBE_DTYPES = ("fp32", "bf16")
ATTENTION_KEYS = tuple(f"{pass_}/{dtype}" for dtype in PROBE_DTYPES for pass_ in ("fwd", "bwd"))


class ProbeBlock(nn.Module):
    """A pre-norm Transformer block on ``[batch, seq, dim]``: causal attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(attended)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


@dataclass(frozen=True)
class StepCosts:
    """The probe's figures (see the module docstring)."""

    flops_per_s: dict[str, float]
    op_overhead_s: float
    autocast_cast_s_per_param: float
    attention: dict[str, AttentionFit] = field(default_factory=dict)  # "<fwd|bwd>/<dtype>" → its line

    def to_values(self) -> list[float]:
        """The figures as one list of floats (seconds per FLOP, per operator, per call...), in which a figure
        this rank did not measure is 0: an all-reduce (MAX) of the lists gives every rank the measuring rank's."""
        return (
            [1 / self.flops_per_s[d] for d in PROBE_DTYPES]
            + [self.op_overhead_s, self.autocast_cast_s_per_param]
            + [
                x
                for fit in (self.attention[key] for key in ATTENTION_KEYS)
                for x in (fit.per_call_s, 1 / fit.flops_per_s)
            ]
        )

    @classmethod
    def from_values(cls, values: list[float]) -> "StepCosts":
        """The figures ``to_values`` listed."""
        n = len(PROBE_DTYPES)
        attention = values[n + 2 :]
        return cls(
            {d: 1 / s for d, s in zip(PROBE_DTYPES, values[:n])},
            values[n],
            values[n + 1],
            {key: AttentionFit(attention[2 * i], 1 / attention[2 * i + 1]) for i, key in enumerate(ATTENTION_KEYS)},
        )

    @classmethod
    def unmeasured(cls) -> "StepCosts":
        """A rank's figures where another rank measures: every value 0 in ``to_values``."""
        return cls(
            {d: math.inf for d in PROBE_DTYPES}, 0.0, 0.0, {key: AttentionFit(0.0, math.inf) for key in ATTENTION_KEYS}
        )

    def slowed(self, factor: float) -> "StepCosts":
        """The figures when compute runs ``factor`` times slower (every rank computing at once)."""
        return StepCosts(
            {d: f / factor for d, f in self.flops_per_s.items()},
            self.op_overhead_s * factor,
            self.autocast_cast_s_per_param * factor,
            {key: fit.slowed(factor) for key, fit in self.attention.items()},
        )


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _step(block: ProbeBlock, x: torch.Tensor, device: torch.device, dtype: str) -> None:
    with _autocast(device, dtype):
        loss = block(x).float().sum()
    loss.backward()
    block.zero_grad(set_to_none=True)


def probe_step(dim: int, tokens: int, device: torch.device) -> Callable[[], None]:
    """One fp32 forward and backward of the probe block on ``tokens`` tokens of width ``dim``: the mix of
    matmuls and memory-bound kernels (norms, attention, GELU) that a model's layers run, which slow down
    differently from a matmul alone when processes share cores (``cost.compute_probes.compute_slowdown``)."""
    block = ProbeBlock(dim, heads=max(1, dim // 64)).to(device)
    x = torch.randn(1, tokens, dim, device=device)
    return lambda: _step(block, x, device, "fp32")


def _step_counts(block: ProbeBlock, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs and dispatched operators of the block's fp32 forward and backward, counted as a captured layer's
    are (``passes.analysis.annotate``)."""
    flops, ops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS), DispatchCounter()
    with flops, ops:
        block(x).sum().backward()
    block.zero_grad(set_to_none=True)
    return flops.get_total_flops(), ops.count


def cast_param_count(module: nn.Module) -> int:
    """Parameters bf16 autocast casts at every forward: the weights and biases of the linear layers."""
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))


def measure_step_costs(
    device: torch.device,
    dim: int,
    time_s: Callable[[Callable[[], None]], float],
    batches: tuple[int, ...] = (1, 2, 8),
    seq: int = 32,
) -> StepCosts:
    """The probe's figures on this process. ``time_s(run)``: the median seconds of ``run``. Batches and dtypes
    alternate, so that a drift of the machine reaches every point alike."""
    torch.manual_seed(0)
    block = ProbeBlock(dim, heads=max(1, dim // 64)).to(device)  # heads of 64, as most models have
    inputs = {b: torch.randn(b, seq, dim, device=device) for b in batches}
    counts = {b: _step_counts(block, x) for b, x in inputs.items()}
    flops = {b: f for b, (f, _) in counts.items()}
    seconds: dict[str, dict[int, list[float]]] = {d: {b: [] for b in batches} for d in PROBE_DTYPES}
    for round_ in range(3):
        order = [(d, b) for d in PROBE_DTYPES for b in batches]
        for d, b in order if round_ % 2 == 0 else order[::-1]:
            seconds[d][b].append(time_s(lambda: _step(block, inputs[b], device, d)))
    fits = {
        d: fit_latency_bandwidth([flops[b] for b in batches], [statistics.median(seconds[d][b]) for b in batches])
        for d in PROBE_DTYPES
    }
    ops = counts[batches[0]][1]
    fixed = {d: fits[d].latency_s for d in PROBE_DTYPES}
    return StepCosts(
        flops_per_s={d: fits[d].bandwidth_Bps for d in PROBE_DTYPES},
        op_overhead_s=fixed["fp32"] / ops,
        autocast_cast_s_per_param=max(0.0, fixed["bf16"] - fixed["fp32"]) / cast_param_count(block),
        attention=measure_attention(device, time_s, seq=2 * seq),
    )


ATTENTION_HEAD_DIM, ATTENTION_HEADS = 64, 4


def measure_attention(
    device: torch.device, time_s: Callable[[Callable[[], None]], float], seq: int, batches: tuple[int, ...] = (1, 4)
) -> dict[str, AttentionFit]:
    """Fused causal attention (``scaled_dot_product_attention``) at ``batches`` × ``ATTENTION_HEADS`` heads of
    ``ATTENTION_HEAD_DIM`` over ``seq`` tokens, forward and backward apart, in each dtype: a line through
    (FLOPs, seconds) per pass and dtype, whose intercept is the kernel's cost per call. The inputs are in the
    dtype itself, as a model's projections hand them to attention under autocast."""
    shapes = {b: (b, ATTENTION_HEADS, seq, ATTENTION_HEAD_DIM) for b in batches}
    flops = {
        "fwd": {b: sdpa_flop_count(shape, shape, shape) for b, shape in shapes.items()},
        "bwd": {b: sdpa_backward_flop_count(shape, shape, shape, shape) for b, shape in shapes.items()},
    }
    fits = {}
    for dtype in PROBE_DTYPES:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        seconds: dict[str, list[float]] = {"fwd": [], "bwd": []}
        for shape in shapes.values():
            q, k, v = (torch.randn(shape, device=device, dtype=torch_dtype, requires_grad=True) for _ in range(3))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            grad = torch.ones_like(out)
            seconds["fwd"].append(time_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            seconds["bwd"].append(time_s(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)))
        for pass_ in ("fwd", "bwd"):
            line = fit_latency_bandwidth([flops[pass_][b] for b in batches], seconds[pass_])
            fits[f"{pass_}/{dtype}"] = AttentionFit(line.latency_s, line.bandwidth_Bps)
    return fits
