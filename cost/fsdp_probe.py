"""What an FSDP2 unit costs a training step where its collectives are waited for in place (CPUs).

Without communication streams FSDP2 runs every gather and reduce-scatter in the middle of compute and
waits for it, and around each it copies parameters and gradients into and out of flat buffers. Raw
collective timings miss those copies and waits (a ZeRO layer of GPT-2 on two gloo processes costs about
twice its collectives), so this probe times FSDP2 itself: a stack of ``UNITS`` square linear layers, each
its own ``fully_shard`` unit, on a few tokens (compute is negligible), against the same stack unsharded.
The difference per unit is the unit's price per step, for ZeRO-3 (gathered in forward and again in
backward) and ZeRO-2 (kept gathered from forward to backward), per group size and parameter size.

Runs on every rank of the default process group; each rank returns its own medians (the caller keeps
the slowest rank's).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

UNITS = 4
TOKENS = 8


def sharded_unit_times(
    sizes_bytes: tuple[int, ...], median_s: Callable[[Callable[[], None]], float], device: torch.device
) -> dict[tuple[str, int, int], float]:
    """{(zero2|zero3, group size, unit's fp32 parameter bytes): seconds per unit per step} on this rank,
    for every power-of-two group size ≥ 2 dividing the world (groups of consecutive ranks). ``median_s(run)``
    times ``run`` on every rank at once (the hardware profiler's timer)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    groups = [2**k for k in range(1, world.bit_length()) if world % 2**k == 0]
    meshes = {
        g: init_device_mesh(device.type, (world // g, g), mesh_dim_names=("replicas", "shards"))["shards"]
        for g in groups
    }
    times: dict[tuple[str, int, int], float] = {}
    for nbytes in sizes_bytes:
        width = max(int(math.sqrt(nbytes / 4)), 8)
        local = median_s(_step(_stack(width, device), width, device))
        for group, mesh in meshes.items():
            for kind in ("zero2", "zero3"):
                sharded = _stack(width, device)
                _shard(sharded, mesh, reshard_after_forward=kind == "zero3")
                seconds = median_s(_step(sharded, width, device))
                dist.barrier()  # every rank's last collective is done before the stack is freed
                times[(kind, group, width * width * 4)] = max(0.0, seconds - local) / UNITS
    return times


def _stack(width: int, device: torch.device) -> torch.nn.Sequential:
    return torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False, device=device) for _ in range(UNITS)))


def _shard(stack: torch.nn.Sequential, mesh, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in stack:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(stack, mesh=mesh, reshard_after_forward=reshard_after_forward)  # the root holds no parameter


def _step(stack: torch.nn.Sequential, width: int, device: torch.device) -> Callable[[], None]:
    """Forward + backward of ``stack`` on a few tokens, gradients dropped (as zero_grad(set_to_none) does)."""
    x = torch.randn(TOKENS, width, device=device)

    def step():
        stack(x).sum().backward()
        for param in stack.parameters():
            param.grad = None

    return step
