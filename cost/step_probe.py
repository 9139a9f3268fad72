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
- ``autocast_cast_s_per_param``: what the bf16 intercept adds, per parameter autocast casts.

The probe's operators and parameters are not any model's: the figures transfer to the models the analytic
profile prices by their own counts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from galvatron_fx.passes.analysis.annotate import CPU_ATTENTION_FLOPS, DispatchCounter

from .hardware import fit_latency_bandwidth

PROBE_DTYPES = ("fp32", "bf16")


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

    def slowed(self, factor: float) -> "StepCosts":
        """The figures when compute runs ``factor`` times slower (every rank computing at once)."""
        return StepCosts(
            {d: f / factor for d, f in self.flops_per_s.items()},
            self.op_overhead_s * factor,
            self.autocast_cast_s_per_param * factor,
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
    )
