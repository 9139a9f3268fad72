"""The global gradient norm of the whole model, and clipping by it, over every kind of shard a plan makes.

Each rank holds pieces of parameters: FSDP2 shards (DTensors), tensor-parallel shards, whole copies replicated
over data parallelism, tied weights on several stages, and the parameters of its pipeline stage only. The
squared norm of the whole gradient is the sum over ranks of each rank's local squares, each divided by the
number of ranks that hold that same element. That number is counted once, when the trainer is built: every
rank adds, for each parameter of the model, the fraction of its elements it holds, and one all-reduce over the
world sums the fractions (one for a parameter sharded over its group, ``dp`` for one replicated over ``dp``
ranks, 2 × ... for a tied weight on two stages). A step then costs one scalar all-reduce and no host sync:
the norm stays on the device until someone reads it. Clipping scales every local gradient by
``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .shard_maps import local_tensor, tp_records


def _held_fraction(param: torch.Tensor, record) -> float:
    """The fraction of the user's full parameter this rank holds: its FSDP2 block of its tensor-parallel
    shard, not counting the padding rows of a vocabulary that does not divide by the group."""
    fraction = local_tensor(param).numel() / param.numel() if isinstance(param, DTensor) else 1.0
    if record is not None:
        fraction *= float((record.positions() >= 0).sum()) / math.prod(record.full_shape)
    return fraction


class GlobalGradNorm:
    """Norm of the gradient of every parameter of the model, on every rank. Built collectively (one all-reduce
    over the world); ``all_param_names``: every parameter name of the model, in the same order on every rank."""

    def __init__(self, stage, all_param_names: list[str], device: torch.device):
        params, records = stage.user_parameters(), tp_records(stage)
        fractions = torch.zeros(len(all_param_names), dtype=torch.float64, device=device)
        for i, name in enumerate(all_param_names):
            if name in params:
                fractions[i] = _held_fraction(params[name], records.get(name))
        dist.all_reduce(fractions)
        copies = dict(zip(all_param_names, fractions.tolist()))
        by_weight: dict[float, list[torch.nn.Parameter]] = defaultdict(list)
        for name, param in stage.user_parameters().items():
            by_weight[1.0 / copies[name]].append(param)
        self._params_by_weight = dict(by_weight)  # 1 / (ranks holding each element) → parameters
        self.device = device

    def _grads(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [local_tensor(p.grad) for p in params if p.grad is not None]

    def norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients as they are now (after gradient synchronisation). Collective."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for weight, params in self._params_by_weight.items():
            grads = self._grads(params)
            if grads:
                norms = torch._foreach_norm(grads, 2)
                total += torch.stack(norms).float().pow(2).sum() * weight
        dist.all_reduce(total)
        return total.sqrt()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient so that the global norm is at most ``max_norm``; returns the norm before.
        Collective."""
        norm = self.norm()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [g for params in self._params_by_weight.values() for g in self._grads(params)]
        if grads:
            torch._foreach_mul_(grads, scale)
        return norm
